"""Official checkpoint conversion (`convert_official`, `timm-layerattn convert`) and `load_trunk`.

The official checkpoints are rebuilt here from the key tables of `layer_attention.md` (§0.4, §1.5, §1.7, §2.3,
§2.5, §3.3, §3.5): names, shapes and which cells carry the re-init extras are written out independently of the
package's renaming rules. Their sizes are checked against the parameter counts the spec measured with the
official code, so the generator itself is pinned to the real layouts. Parity is then checked against a
functional forward written from the spec's formulas that reads the *official* tensors directly.
"""
import math
from typing import Dict, Optional, Tuple

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official, load_trunk
from timm_layerattn._utils import UserError
from timm_layerattn.cli import main as cli_main
from timm_layerattn.checkpoints.cnntention import remap_keys as remap_cnntention_keys
from timm_layerattn.convert import convert_official_with_report

Shapes = Dict[str, Tuple[int, ...]]

# ---------------------------------------------------------------------------------------------------------------
# Official layouts, from the spec
# ---------------------------------------------------------------------------------------------------------------


def _eca_k(c: int) -> int:
    """Spec §0.1: t = int(|(log2 C + 1) / 2|), k = t if odd else t + 1."""
    t = int(abs((math.log(c, 2) + 1) / 2))
    return t if t % 2 else t + 1


BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _bn(prefix: str, c: int) -> Shapes:
    return {prefix + f: (() if f == 'num_batches_tracked' else (c,)) for f in BN_FIELDS}


def official_shapes(variant: str, family: str, depth: int, head_dim: Optional[int] = None,
                    num_classes: Optional[int] = None) -> Shapes:
    """Key -> shape of an official checkpoint.

    Args:
        variant: 'imagenet' (ResNet-50/101 builders) or 'cifar' (bgx666/KCLA cifar/models/cifar, Bottleneck).
        family: 'plain', 'kcla', 'mrla_light', 'mrla_base'.
        depth: 50 / 101 (ImageNet) or 20 / 56 / 110 (CIFAR, 9n+2).
    """
    imagenet = variant == 'imagenet'
    if imagenet:
        layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
        planes, num_classes = (64, 128, 256, 512), num_classes or 1000
        head_dim = head_dim or {'kcla': 64, 'mrla_light': 32, 'mrla_base': 16}.get(family)
    else:
        n = (depth - 2) // 9
        layers, planes, num_classes = (n, n, n), (16, 32, 64), num_classes or 10
        head_dim = head_dim or 16
    s: Shapes = {}
    if imagenet and family == 'mrla_base':  # deep stem (§0.4, §3.3)
        s['conv1.0.weight'] = (32, 3, 3, 3)
        s.update(_bn('conv1.1.', 32))
        s['conv1.3.weight'] = (32, 32, 3, 3)
        s.update(_bn('conv1.4.', 32))
        s['conv1.6.weight'] = (64, 32, 3, 3)
        inplanes = 64
    elif imagenet:
        s['conv1.weight'] = (64, 3, 7, 7)
        inplanes = 64
    else:
        s['conv1.weight'] = (16, 3, 3, 3)
        inplanes = 16
    s.update(_bn('bn1.', inplanes))
    for si, (p, nblocks) in enumerate(zip(planes, layers)):
        c = p * 4
        for i in range(nblocks):
            if family == 'kcla' and imagenet:
                trunk, cell = f'layer{si + 1}.layers.{i}.', f'layer{si + 1}.attention.{i}.'
            elif family == 'kcla':
                trunk = f'stages.{si}.{i}.'
                cell = trunk + 'kcla.'
            elif family == 'mrla_base':
                trunk = cell = f'stages.{si}.{i}.'
            else:
                trunk = cell = f'layer{si + 1}.{i}.'
            s[trunk + 'conv1.weight'] = (p, inplanes, 1, 1)
            s.update(_bn(trunk + 'bn1.', p))
            s[trunk + 'conv2.weight'] = (p, p, 3, 3)
            s.update(_bn(trunk + 'bn2.', p))
            s[trunk + 'conv3.weight'] = (c, p, 1, 1)
            s.update(_bn(trunk + 'bn3.', c))
            if i == 0:
                s[trunk + 'downsample.0.weight'] = (c, inplanes, 1, 1)
                s.update(_bn(trunk + 'downsample.1.', c))
            k, g = _eca_k(c), c // head_dim if head_dim else 0
            if family == 'kcla':
                s[cell + 'norm_d'] = (1, g, 1, 1, 1)
                s[cell + 'Wq.weight'] = (1, 1, k)
                s[cell + 'Wk.weight'] = (1, 1, k)
                s[cell + 'Wv.weight'] = (c, 1, 3, 3)
                s[cell + 'head_att.weight'] = (g, g)
                s.update(_bn(cell + 'bn_attention.', c))
                if i == 0 or (imagenet and i == 11):  # init cells
                    s[cell + 'adjust_channel.weight'] = (c, head_dim // 2, 1, 1)
                    s[cell + 'u_Wk.weight'] = (1, 1, k)
                    s.update(_bn(cell + 'u_bn.', c))
            elif family in ('mrla_light', 'mrla_base'):
                if family == 'mrla_light':
                    s[cell + 'mrla.lambda_t'] = (c, 1, 1)
                s[cell + 'mrla.mrla.Wq.weight'] = (1, 1, k)
                s[cell + 'mrla.mrla.Wk.weight'] = (1, 1, k)
                s[cell + 'mrla.mrla.Wv.weight'] = (c, 1, 3, 3)
                s.update(_bn(cell + 'bn_mrla.', c))
            inplanes = c
    s['fc.weight'] = (num_classes, inplanes)
    s['fc.bias'] = (num_classes,)
    return s


def _numel(shapes: Shapes, params_only: bool = True) -> int:
    skip = ('running_mean', 'running_var', 'num_batches_tracked')
    return sum(math.prod(v) for k, v in shapes.items() if not (params_only and k.endswith(skip)))


def kcla_norm_d(g: int) -> torch.Tensor:
    """Spec §1.4: s = exp(linspace(log 0.7, log(1/0.7), g)) in float32 torch ops, norm_d = 1 / s."""
    lo, hi = torch.log(torch.tensor(0.7)).item(), torch.log(torch.tensor(1 / 0.7)).item()
    return torch.exp(torch.linspace(lo, hi, g)).reciprocal()


def materialize(shapes: Shapes, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random, well-scaled official tensors (BN statistics included, so BN mapping errors show)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith('num_batches_tracked'):
            v = torch.tensor(123, dtype=torch.long)
        elif k.endswith('norm_d'):
            v = kcla_norm_d(shape[1]).view(shape)
        elif k.endswith('running_var'):
            v = torch.rand(shape, generator=gen) + 0.5
        elif k.endswith('running_mean'):
            v = torch.randn(shape, generator=gen) * 0.1
        elif k.endswith('.weight') and len(shape) == 1:  # BN scale
            v = torch.rand(shape, generator=gen) * 0.4 + 0.3
        elif k.endswith('.bias') and len(shape) == 1:
            v = torch.randn(shape, generator=gen) * 0.1
        elif k.endswith('lambda_t'):
            v = torch.randn(shape, generator=gen) * 0.5
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            v = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(max(fan_in, 1)))
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reference forward of the official networks, from the spec's formulas, reading official tensors
# ---------------------------------------------------------------------------------------------------------------

def _bn_f(x, sd, p):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                        False, 0., 1e-5)


def _eca_f(pooled, w):
    return F.conv1d(pooled.unsqueeze(1), w, padding=(w.shape[-1] - 1) // 2).squeeze(1)


def _kcla_f(x, state, sd, p, init):
    """Spec §1.1 / §1.2 with the official (U, Z) state."""
    b, c, h, w = x.shape
    norm_d = sd[p + 'norm_d'].view(1, -1)
    g = norm_d.shape[1]
    d = c // g
    if state is not None and init:
        u, z = state
        a = (u / z).reshape(b, -1, *u.shape[-2:])
        if a.shape[1] != c:
            a = F.conv2d(a, sd[p + 'adjust_channel.weight'], stride=2, groups=g)
        a = _bn_f(a, sd, p + 'u_bn.')
        kappa = _eca_f(a.mean((2, 3)), sd[p + 'u_Wk.weight']).view(b, g, d)
        beta = torch.exp(torch.clamp(torch.norm(kappa, dim=2) / norm_d, max=10))
        state = (beta.view(b, g, 1, 1, 1) * a.view(b, g, d, *a.shape[-2:]), beta.view(b, g, 1, 1, 1))
    pooled = x.mean((2, 3))
    q = _eca_f(pooled, sd[p + 'Wq.weight']).view(b, g, d)
    k = _eca_f(pooled, sd[p + 'Wk.weight']).view(b, g, d)
    n = torch.norm(k, dim=2)
    alpha = torch.exp(torch.clamp(n / norm_d, max=10)).view(b, g, 1, 1, 1)
    xa = alpha * x.view(b, g, d, h, w)
    u, z = (xa, alpha) if state is None else (state[0] + xa, state[1] + alpha)
    a = (u / (z + 1e-3)).reshape(b, c, h, w)
    v = F.conv2d(a, sd[p + 'Wv.weight'], padding=1, groups=c)
    e = (q * k).sum(2) / n
    gate = torch.sigmoid(e @ sd[p + 'head_att.weight'].t()).repeat_interleave(d, 1)[:, :, None, None]
    return x + F.relu(_bn_f(gate * v, sd, p + 'bn_attention.')), (u, z)


def _mrla_light_f(x, shortcut, sd, p, d):
    """Spec §2.1."""
    b, c = x.shape[:2]
    g = c // d
    pooled = x.mean((2, 3))
    q = _eca_f(pooled, sd[p + 'mrla.mrla.Wq.weight']).view(b, g, d)
    k = _eca_f(pooled, sd[p + 'mrla.mrla.Wk.weight']).view(b, g, d)
    a = torch.sigmoid((q * k).sum(2) * (1 / math.sqrt(d))).repeat_interleave(d, 1)[:, :, None, None]
    v = F.conv2d(x, sd[p + 'mrla.mrla.Wv.weight'], padding=1, groups=c)
    return x + _bn_f(a * v + sd[p + 'mrla.lambda_t'] * shortcut, sd, p + 'bn_mrla.')


def _mrla_base_f(x, cache, sd, p, d, first):
    """Spec §3.1: softmax over the keys of the stage's earlier blocks, cached values summed."""
    b, c = x.shape[:2]
    g = c // d
    pooled = x.mean((2, 3))
    q = _eca_f(pooled, sd[p + 'mrla.mrla.Wq.weight']).view(b, g, d)
    k = _eca_f(pooled, sd[p + 'mrla.mrla.Wk.weight']).view(b, 1, g, d)
    v = F.conv2d(x, sd[p + 'mrla.mrla.Wv.weight'], padding=1, groups=c)
    keys, values = (k, [v]) if first else (torch.cat([cache[0], k], 1), cache[1] + [v])
    attn = ((q.unsqueeze(1) * keys).sum(-1) / math.sqrt(d)).softmax(dim=1)  # [B, T, g]
    o = sum(attn[:, j].repeat_interleave(d, 1)[:, :, None, None] * values[j] for j in range(len(values)))
    return x + F.relu(_bn_f(o, sd, p + 'bn_mrla.')), (keys, values)


def official_forward(sd, variant: str, family: str, depth: int, x, head_dim: Optional[int] = None):
    imagenet = variant == 'imagenet'
    if imagenet:
        layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    else:
        layers = ((depth - 2) // 9,) * 3
    d = head_dim or (16 if not imagenet or family == 'mrla_base' else 32)
    if 'conv1.0.weight' in sd:
        x = F.relu(_bn_f(F.conv2d(x, sd['conv1.0.weight'], stride=2, padding=1), sd, 'conv1.1.'))
        x = F.relu(_bn_f(F.conv2d(x, sd['conv1.3.weight'], padding=1), sd, 'conv1.4.'))
        x = F.conv2d(x, sd['conv1.6.weight'], padding=1)
    elif imagenet:
        x = F.conv2d(x, sd['conv1.weight'], stride=2, padding=3)
    else:
        x = F.conv2d(x, sd['conv1.weight'], padding=1)
    x = F.relu(_bn_f(x, sd, 'bn1.'))
    if imagenet:
        x = F.max_pool2d(x, 3, 2, 1)
    state = cache = None
    for si, nblocks in enumerate(layers):
        for i in range(nblocks):
            stride = 2 if si > 0 and i == 0 else 1
            if family == 'kcla' and imagenet:
                trunk, cell = f'layer{si + 1}.layers.{i}.', f'layer{si + 1}.attention.{i}.'
            elif family == 'kcla':
                trunk = f'stages.{si}.{i}.'
                cell = trunk + 'kcla.'
            elif family == 'mrla_base':
                trunk = cell = f'stages.{si}.{i}.'
            else:
                trunk = cell = f'layer{si + 1}.{i}.'
            out = F.relu(_bn_f(F.conv2d(x, sd[trunk + 'conv1.weight']), sd, trunk + 'bn1.'))
            out = F.relu(_bn_f(F.conv2d(out, sd[trunk + 'conv2.weight'], stride=stride, padding=1), sd, trunk + 'bn2.'))
            out = _bn_f(F.conv2d(out, sd[trunk + 'conv3.weight']), sd, trunk + 'bn3.')
            shortcut = x
            if trunk + 'downsample.0.weight' in sd:
                shortcut = F.conv2d(x, sd[trunk + 'downsample.0.weight'], stride=stride)
                shortcut = _bn_f(shortcut, sd, trunk + 'downsample.1.')
            x = F.relu(out + shortcut)
            if family == 'kcla':
                x, state = _kcla_f(x, state, sd, cell, init=i == 0 or (imagenet and i == 11))
            elif family == 'mrla_light':
                x = _mrla_light_f(x, shortcut, sd, cell, d)
            elif family == 'mrla_base':
                x, cache = _mrla_base_f(x, cache, sd, cell, d, first=i == 0)
    return F.linear(x.mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


def _check_parity(model_name: str, variant: str, family: str, depth: int, size: int, head_dim=None,
                  model_head_dim=None):
    official = materialize(official_shapes(variant, family, depth, head_dim=head_dim))
    converted = convert_official({'state_dict': {'module.' + k: v for k, v in official.items()}, 'epoch': 90},
                                 model_name, head_dim=model_head_dim)
    kwargs = {'head_dim': model_head_dim} if model_head_dim else {}
    model = timm.create_model(model_name, **kwargs).eval()
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(official, variant, family, depth, x, head_dim=head_dim)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# The generator matches the official layouts the spec measured
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family,depth,head_dim,entries,total', [
    ('kcla', 50, 64, 508, 25_859_078),
    ('kcla', 101, 64, None, 45_082_309),
    ('kcla', 50, 32, None, 25_812_610),
    ('kcla', 101, 32, None, 45_032_785),
    ('mrla_light', 50, None, 464, 25_738_452),
    ('mrla_light', 101, None, None, 44_939_646),
    ('mrla_base', 50, None, 460, 25_742_580),
    ('mrla_base', 101, None, None, 44_926_366),
])
def test_official_imagenet_layout_matches_spec_counts(family, depth, head_dim, entries, total):
    shapes = official_shapes('imagenet', family, depth, head_dim=head_dim)
    assert _numel(shapes) == total
    if entries is not None:
        assert len(shapes) == entries


@pytest.mark.parametrize('depth,counts', [
    (20, {'plain': 220_378, 'kcla': 235_507, 'mrla_light': 231_182, 'mrla_base': 230_286}),
    (56, {'plain': 591_322, 'kcla': 627_723, 'mrla_light': 623_734, 'mrla_base': 621_046}),
    (110, {'plain': 1_147_738, 'kcla': 1_216_047, 'mrla_light': 1_212_562, 'mrla_base': 1_207_186}),
])
def test_official_cifar_layout_matches_spec_counts(depth, counts):
    for family, total in counts.items():
        assert _numel(official_shapes('cifar', family, depth)) == total, family


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('model_name,family', [
    ('cifar_resnet20', 'plain'),
    ('cifar_resnet20_kcla', 'kcla'),
    ('cifar_resnet20_mrlal', 'mrla_light'),
    ('cifar_resnet20_mrlab', 'mrla_base'),
    ('cifar_resnet110_kcla', 'kcla'),  # 12 blocks per stage: CIFAR re-inits at block 0 only
])
def test_cifar_parity(model_name, family):
    depth = int(model_name.split('_')[1][len('resnet'):])
    _check_parity(model_name, 'cifar', family, depth, size=32)


@pytest.mark.parametrize('model_name,family,depth,head_dim', [
    ('resnet50_kcla', 'kcla', 50, 32),
    ('resnet101_kcla', 'kcla', 101, 32),  # re-init cell at layer3 block 11, without the adjust conv
    ('resnet50_mrlal', 'mrla_light', 50, None),
    ('resnet50_mrlab', 'mrla_base', 50, None),
])
def test_imagenet_parity(model_name, family, depth, head_dim):
    _check_parity(model_name, 'imagenet', family, depth, size=64, head_dim=head_dim)


def test_kcla_released_head_dim_64():
    """The released ImageNet KCLA code uses head dim 64: refused for the default model, loads with head_dim=64."""
    official = materialize(official_shapes('imagenet', 'kcla', 50, head_dim=64))
    with pytest.raises(UserError, match=r'head dim is 64.*head_dim=64'):
        convert_official(official, 'resnet50_kcla')
    _check_parity('resnet50_kcla', 'imagenet', 'kcla', 50, size=64, head_dim=64, model_head_dim=64)


@pytest.mark.parametrize('model_name,family,depth', [
    ('resnet101_mrlal', 'mrla_light', 101),
    ('resnet101_mrlab', 'mrla_base', 101),
    ('cifar_resnet56', 'plain', 56),
    ('cifar_resnet56_kcla', 'kcla', 56),
    ('cifar_resnet56_mrlal', 'mrla_light', 56),
    ('cifar_resnet56_mrlab', 'mrla_base', 56),
    ('cifar_resnet110', 'plain', 110),
    ('cifar_resnet110_mrlal', 'mrla_light', 110),
    ('cifar_resnet110_mrlab', 'mrla_base', 110),
])
def test_strict_conversion_other_architectures(model_name, family, depth):
    """Every remaining official architecture converts and fits the model exactly (checked on the meta device)."""
    variant = 'cifar' if model_name.startswith('cifar') else 'imagenet'
    shapes = official_shapes(variant, family, depth)
    official = {k: torch.empty(v, device='meta') for k, v in shapes.items()}
    if family == 'kcla':
        official.update({k: kcla_norm_d(v[1]).view(v) for k, v in shapes.items() if k.endswith('norm_d')})
    converted = convert_official(official, model_name)
    expected = timm.create_model(model_name, device='meta').state_dict()
    assert list(converted) == list(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_known_unused_kcla_parameters_are_dropped_with_a_note(caplog):
    official = materialize(official_shapes('imagenet', 'kcla', 101, head_dim=32))
    with caplog.at_level('INFO', logger='timm_layerattn.convert'):
        _, report = convert_official_with_report(official, 'resnet101_kcla')
    first_cell = ['layer1.attention.0.adjust_channel.weight', 'layer1.attention.0.u_Wk.weight'] + [
        f'layer1.attention.0.u_bn.{n}' for n in BN_FIELDS]
    assert sorted(report.dropped) == sorted(first_cell + ['layer3.attention.11.adjust_channel.weight'])
    assert 'never run' in caplog.text and 'layer3.attention.11.adjust_channel.weight' in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------

def _cifar20(family: str) -> Dict[str, torch.Tensor]:
    return materialize(official_shapes('cifar', family, 20))


def test_unexpected_key_is_named():
    sd = _cifar20('mrla_light')
    sd['layer2.1.mrla.mrla.Wx.weight'] = torch.zeros(1, 1, 5)
    with pytest.raises(UserError, match=r'unexpected key.*layer2\.1\.mrla\.mrla\.Wx\.weight'):
        convert_official(sd, 'cifar_resnet20_mrlal')


def test_unexpected_kcla_extra_outside_known_cells_is_an_error():
    sd = _cifar20('kcla')
    sd['stages.1.1.kcla.u_Wk.weight'] = torch.zeros(1, 1, 5)  # not an init cell in the official CIFAR code
    with pytest.raises(UserError, match=r'stages\.1\.1\.kcla\.u_Wk\.weight'):
        convert_official(sd, 'cifar_resnet20_kcla')


def test_missing_key_and_shape_mismatch_are_named():
    sd = _cifar20('kcla')
    del sd['stages.2.1.kcla.head_att.weight']
    with pytest.raises(UserError, match=r'missing key.*layer3\.1\.attn\.head_gate\.weight'):
        convert_official(sd, 'cifar_resnet20_kcla')
    sd = _cifar20('mrla_base')
    sd['stages.0.1.mrla.mrla.Wv.weight'] = torch.zeros(64, 1, 5, 5)
    with pytest.raises(UserError, match=r'shape mismatch.*stages\.0\.1\.mrla\.mrla\.Wv\.weight'):
        convert_official(sd, 'cifar_resnet20_mrlab')


def test_wrong_family_depth_and_norm_d_are_refused():
    with pytest.raises(UserError, match=r'official kcla checkpoint.*mrla_light'):
        convert_official(_cifar20('kcla'), 'cifar_resnet20_mrlal')
    with pytest.raises(UserError, match=r"6-6-6 blocks per stage.*use 'cifar_resnet56_mrlab'"):
        convert_official(materialize(official_shapes('cifar', 'mrla_base', 56)), 'cifar_resnet20_mrlab')
    sd = _cifar20('kcla')
    sd['stages.0.0.kcla.norm_d'] = sd['stages.0.0.kcla.norm_d'] * 1.5
    with pytest.raises(UserError, match='norm_d'):
        convert_official(sd, 'cifar_resnet20_kcla')
    with pytest.raises(UserError, match='DLA'):
        convert_official({'stages.0.lstm.weight': torch.zeros(2)}, 'cifar_resnet20_kcla')


def test_mrla_base22_variant_is_refused():
    """resnet_mrla_base22.py (7x7 stem, no ReLU after BN_mrla) is detected by its stem shape (spec Q21)."""
    shapes = official_shapes('imagenet', 'mrla_base', 50)
    for k in [k for k in shapes if k.startswith(('conv1.', 'bn1.'))]:
        del shapes[k]
    shapes['conv1.weight'] = (64, 3, 7, 7)
    shapes.update(_bn('bn1.', 64))
    official = {k: torch.empty(v, device='meta') for k, v in shapes.items()}
    with pytest.raises(UserError, match='resnet_mrla_base22'):
        convert_official(official, 'resnet50_mrlab')


def test_converted_layout_is_checked_not_reconverted():
    model = timm.create_model('cifar_resnet20_mrlal')
    out = convert_official(model.state_dict(), 'cifar_resnet20_mrlal')
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def test_cli_convert_training_checkpoint(tmp_path, capsys):
    official = _cifar20('kcla')
    ckpt = {'epoch': 299, 'arch': 'kcla', 'best_acc': torch.tensor(77.5),
            'state_dict': {'module.' + k: v for k, v in official.items()},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}}
    src, out = tmp_path / 'checkpoint.pth.tar', tmp_path / 'kcla20.safetensors'
    torch.save(ckpt, src)
    assert cli_main(['convert', '--model', 'cifar_resnet20_kcla', str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert 'dropped 7 official parameter(s) that never run' in text and 'stages.0.0.kcla.u_Wk.weight' in text
    model = timm.create_model('cifar_resnet20_kcla', pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    expected = convert_official(official, 'cifar_resnet20_kcla')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    # refuses to overwrite, and a wrong model leaves no file behind
    assert cli_main(['convert', '--model', 'cifar_resnet20_kcla', str(src), str(out)]) == 2
    bad = tmp_path / 'bad.safetensors'
    assert cli_main(['convert', '--model', 'cifar_resnet20_mrlab', str(src), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith('timm-layerattn convert: error:') for line in err)
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth.tar', 'kcla20.safetensors']


# ---------------------------------------------------------------------------------------------------------------
# CNNtention key map (cnntention.md §6)
# ---------------------------------------------------------------------------------------------------------------

_CNNTENTION_TRUNK = ['conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer3.2.bn2.running_var', 'fc.weight']
_CNNTENTION_OFFICIAL = {
    'selfatt': {'weights': 'gamma', 'query.weight': 'q.weight', 'query.bias': 'q.bias', 'key.weight': 'k.weight',
                'key.bias': 'k.bias', 'value.weight': 'v.weight', 'value.bias': 'v.bias'},
    'mha': {'weights': 'gamma', 'key.weight': 'q.weight', 'key.bias': 'q.bias', 'query.weight': 'k.weight',
            'query.bias': 'k.bias', 'val.weight': 'v.weight', 'val.bias': 'v.bias', 'linear.weight': 'proj.weight',
            'linear.bias': 'proj.bias'},
    'cbam': {'channel_attention.mlp.0.weight': 'channel_mlp.fc1.weight',
             'channel_attention.mlp.2.weight': 'channel_mlp.fc2.weight',
             'spatial_attention.conv.weight': 'spatial_conv.weight',
             'spatial_attention.conv.bias': 'spatial_conv.bias'},
}


@pytest.mark.parametrize('variant', ['selfatt', 'mha', 'cbam'])
def test_cnntention_key_map(variant):
    official = {k: torch.tensor(float(i)) for i, k in enumerate(_CNNTENTION_TRUNK)}
    for site in (1, 2, 3):
        for j, name in enumerate(_CNNTENTION_OFFICIAL[variant]):
            official[f'att{site}.{name}'] = torch.tensor(100. * site + j)
    out = remap_cnntention_keys(official, variant)
    expected = {k: k for k in _CNNTENTION_TRUNK}
    expected.update({f'att{s}.{o}': f'layer{s}.attn.{n}' for s in (1, 2, 3)
                     for o, n in _CNNTENTION_OFFICIAL[variant].items()})
    assert sorted(out) == sorted(expected.values())
    for old, new in expected.items():
        assert out[new] is official[old]


@pytest.mark.parametrize('variant', ['selfatt', 'mha', 'cbam'])
def test_cnntention_checkpoint_converts(variant):
    name = f'cifar_resnet20_basic_{variant}'
    if not timm.is_model(name):
        pytest.skip(f'{name} is not registered yet (CNNtention models are added by the CNNtention work)')
    model = timm.create_model(name).eval()
    ours = model.state_dict()
    to_official = {f'layer{s}.attn.{n}': f'att{s}.{o}'
                   for s in (1, 2, 3) for o, n in _CNNTENTION_OFFICIAL[variant].items()}
    official = {to_official.get(k, k): torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.items()}
    converted = convert_official(official, name)
    model.load_state_dict(converted, strict=True)
    for k in ours:
        assert torch.equal(converted[k], official[to_official.get(k, k)])


# ---------------------------------------------------------------------------------------------------------------
# load_trunk
# ---------------------------------------------------------------------------------------------------------------

def test_load_trunk_from_timm_resnet50_state_dict():
    src = timm.create_model('resnet50').state_dict()
    model = timm.create_model('resnet50_kcla')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = load_trunk(model, src)
    after = model.state_dict()
    assert len(result.loaded) == len(src) and not result.skipped  # every timm resnet50 tensor fits the trunk
    for k in result.loaded:
        assert torch.equal(after[k], src[k])
    attn = [k for k in after if '.attn.' in k]
    assert sorted(result.missing) == sorted(attn)
    for k in result.missing:
        assert torch.equal(after[k], before[k])
    assert f'left {len(attn)} at init ({len(attn)} attention, 0 other)' in result.summary()


def test_load_trunk_from_file_reports_what_it_skipped(tmp_path):
    src = timm.create_model('cifar_resnet20_mrlal', num_classes=100).state_dict()
    path = tmp_path / 'mrlal100.safetensors'
    safetensors.torch.save_file(src, str(path))
    model = timm.create_model('cifar_resnet20_kcla')  # 10 classes
    result = load_trunk(model, path)
    attn_src = [k for k in src if '.attn.' in k]
    skipped_attn = {k for k, r in result.skipped.items() if r.startswith('attention')}
    assert skipped_attn == {k for k in attn_src if k in model.state_dict()}
    assert result.skipped['fc.weight'] == 'shape mismatch' and result.skipped['fc.bias'] == 'shape mismatch'
    assert all(result.skipped[k] == 'not in model' for k in attn_src if k not in model.state_dict())
    trunk = [k for k in src if '.attn.' not in k and not k.startswith('fc.')]
    assert sorted(result.loaded) == sorted(trunk)
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in trunk)
