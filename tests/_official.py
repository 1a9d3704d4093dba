"""Official-layout checkpoints for the tests: key names, shapes and values of the state dicts the official code saves.

Written out from the key tables of the design pages, independently of the package's renaming rules
(`timm_layerattn/checkpoints/`), so a test that converts one of these checkpoints checks those rules.

KCLA / MRLA (docs/design/layer_attention.md, the `#la-...` anchors below are sections of that page):
    `official_shapes` (key -> shape per family / variant / depth, from #la-imagenet-trunk, #la-kcla-official-keys,
    #la-kcla-cifar, #la-mrla-light-official-keys, #la-mrla-light-cifar, #la-mrla-base-official-keys and
    #la-mrla-base-cifar), `materialize` (seeded random values for such a layout, `official_cifar20` for short),
    `official_to_ours` (our key of an official key, from the same tables) and `official_from_model` (an official
    checkpoint carrying a model's values).
    The generator is pinned to the real layouts by the parameter counts measured with the official code
    (#la-param-counts), checked in tests/test_kcla.py and tests/test_mrla.py.
CNNtention (docs/design/cnntention.md#cnn-conversion):
    `CNNTENTION_KEYS` (official attention names -> ours), `cnntention_attention_shapes` and
    `cnntention_official_state_dict`.
"""
import math
import re
from typing import Dict, Optional, Tuple

import timm
import torch

Shapes = Dict[str, Tuple[int, ...]]

# ---------------------------------------------------------------------------------------------------------------
# KCLA / MRLA (docs/design/layer_attention.md#la-conversion)
# ---------------------------------------------------------------------------------------------------------------

BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def eca_k(c: int) -> int:
    """#la-eca-kernel: t = int(|(log2 C + 1) / 2|), k = t if odd else t + 1."""
    t = int(abs((math.log(c, 2) + 1) / 2))
    return t if t % 2 else t + 1


def bn_shapes(prefix: str, c: int) -> Shapes:
    """The five BatchNorm2d entries of width `c` under `prefix`."""
    return {prefix + f: (() if f == 'num_batches_tracked' else (c,)) for f in BN_FIELDS}


def official_shapes(variant: str, family: str, depth: int, head_dim: Optional[int] = None,
                    num_classes: Optional[int] = None) -> Shapes:
    """Key -> shape of an official checkpoint, in the official code's `state_dict()` order.

    Args:
        variant: 'imagenet' (ResNet-50/101 builders) or 'cifar' (bgx666/KCLA cifar/models/cifar, Bottleneck).
        family: 'plain', 'kcla', 'mrla_light', 'mrla_base'.
        depth: 50 / 101 (ImageNet) or 20 / 56 / 110 (CIFAR, 9n+2).
        head_dim: default 64 (ImageNet KCLA, the released code), 32 (ImageNet MRLA-light), 16 (ImageNet
            MRLA-base, every CIFAR family).
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
    if imagenet and family == 'mrla_base':  # deep stem (#la-imagenet-trunk, #la-mrla-base-official-keys)
        s['conv1.0.weight'] = (32, 3, 3, 3)
        s.update(bn_shapes('conv1.1.', 32))
        s['conv1.3.weight'] = (32, 32, 3, 3)
        s.update(bn_shapes('conv1.4.', 32))
        s['conv1.6.weight'] = (64, 32, 3, 3)
        inplanes = 64
    elif imagenet:
        s['conv1.weight'] = (64, 3, 7, 7)
        inplanes = 64
    else:
        s['conv1.weight'] = (16, 3, 3, 3)
        inplanes = 16
    s.update(bn_shapes('bn1.', inplanes))
    for si, (p, nblocks) in enumerate(zip(planes, layers)):
        c = p * 4
        for i in range(nblocks):
            trunk, cell = official_block_prefixes(variant, family, si, i)
            s[trunk + 'conv1.weight'] = (p, inplanes, 1, 1)
            s.update(bn_shapes(trunk + 'bn1.', p))
            s[trunk + 'conv2.weight'] = (p, p, 3, 3)
            s.update(bn_shapes(trunk + 'bn2.', p))
            s[trunk + 'conv3.weight'] = (c, p, 1, 1)
            s.update(bn_shapes(trunk + 'bn3.', c))
            if i == 0:
                s[trunk + 'downsample.0.weight'] = (c, inplanes, 1, 1)
                s.update(bn_shapes(trunk + 'downsample.1.', c))
            k, g = eca_k(c), c // head_dim if head_dim else 0
            if family == 'kcla':
                s[cell + 'norm_d'] = (1, g, 1, 1, 1)
                s[cell + 'Wq.weight'] = (1, 1, k)
                s[cell + 'Wk.weight'] = (1, 1, k)
                s[cell + 'Wv.weight'] = (c, 1, 3, 3)
                s[cell + 'head_att.weight'] = (g, g)
                s.update(bn_shapes(cell + 'bn_attention.', c))
                if kcla_init_cell(variant, i):
                    s[cell + 'adjust_channel.weight'] = (c, head_dim // 2, 1, 1)
                    s[cell + 'u_Wk.weight'] = (1, 1, k)
                    s.update(bn_shapes(cell + 'u_bn.', c))
            elif family in ('mrla_light', 'mrla_base'):
                if family == 'mrla_light':
                    s[cell + 'mrla.lambda_t'] = (c, 1, 1)
                s[cell + 'mrla.mrla.Wq.weight'] = (1, 1, k)
                s[cell + 'mrla.mrla.Wk.weight'] = (1, 1, k)
                s[cell + 'mrla.mrla.Wv.weight'] = (c, 1, 3, 3)
                s.update(bn_shapes(cell + 'bn_mrla.', c))
            inplanes = c
    s['fc.weight'] = (num_classes, inplanes)
    s['fc.bias'] = (num_classes,)
    return s


def official_block_prefixes(variant: str, family: str, stage: int, block: int) -> Tuple[str, str]:
    """(trunk prefix, attention-cell prefix) of block `block` of stage `stage` (0-based) in an official checkpoint."""
    if family == 'kcla' and variant == 'imagenet':
        return f'layer{stage + 1}.layers.{block}.', f'layer{stage + 1}.attention.{block}.'
    if family == 'kcla':
        trunk = f'stages.{stage}.{block}.'
        return trunk, trunk + 'kcla.'
    if family == 'mrla_base':
        trunk = f'stages.{stage}.{block}.'
        return trunk, trunk
    trunk = f'layer{stage + 1}.{block}.'
    return trunk, trunk


def kcla_init_cell(variant: str, block: int) -> bool:
    """The official builders' rule for the cells carrying adjust_channel / u_Wk / u_bn: every stage's first block,
    and (ImageNet) block 11 of a stage (#la-kcla-official-keys, #la-kcla-cifar)."""
    return block == 0 or (variant == 'imagenet' and block == 11)


def numel(shapes: Shapes, params_only: bool = True) -> int:
    """Entries of a layout, without the BatchNorm statistics unless `params_only` is False."""
    skip = ('running_mean', 'running_var', 'num_batches_tracked')
    return sum(math.prod(v) for k, v in shapes.items() if not (params_only and k.endswith(skip)))


def kcla_norm_d(g: int) -> torch.Tensor:
    """#la-kcla-hparams: s = exp(linspace(log 0.7, log(1/0.7), g)) in float32 torch ops, norm_d = 1 / s."""
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


def official_cifar20(family: str) -> Dict[str, torch.Tensor]:
    """`materialize`d official CIFAR ResNet-20 checkpoint of `family`."""
    return materialize(official_shapes('cifar', family, 20))


# official cell module -> ours (the key tables' "ours" column)
_KCLA_CELL = {'norm_d': 'norm_d', 'Wq': 'q', 'Wk': 'k', 'Wv': 'v', 'head_att': 'head_gate', 'bn_attention': 'norm',
              'adjust_channel': 'hist_proj', 'u_Wk': 'hist_k', 'u_bn': 'hist_norm'}
_MRLA_CELL = {'mrla.lambda_t': 'lambda_t', 'mrla.mrla.Wq': 'q', 'mrla.mrla.Wk': 'k', 'mrla.mrla.Wv': 'v',
              'bn_mrla': 'norm'}


def official_to_ours(key: str) -> str:
    """Our key of an official KCLA / MRLA key (stem, BN and classifier names are shared)."""
    m = re.fullmatch(r'layer(\d+)\.attention\.(\d+)\.(\w+)(.*)', key)  # ImageNet KCLA cell
    if m:
        s, i, mod, rest = m.groups()
        return f'layer{s}.{i}.attn.{_KCLA_CELL[mod]}{rest}'
    m = re.fullmatch(r'layer(\d+)\.layers\.(\d+)\.(.*)', key)  # ImageNet KCLA trunk
    if m:
        return 'layer{}.{}.{}'.format(*m.groups())
    m = re.fullmatch(r'stages\.(\d+)\.(\d+)\.(.*)', key)  # CIFAR KCLA, MRLA-base: 0-based stages
    if m:
        key = f'layer{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}'
    m = re.fullmatch(r'(layer\d+\.\d+\.)kcla\.(\w+)(.*)', key)  # CIFAR KCLA cell
    if m:
        return f'{m.group(1)}attn.{_KCLA_CELL[m.group(2)]}{m.group(3)}'
    m = re.fullmatch(r'(layer\d+\.\d+\.)(mrla\.lambda_t|mrla\.mrla\.W[qkv]|bn_mrla)(.*)', key)  # MRLA cells
    if m:
        return f'{m.group(1)}attn.{_MRLA_CELL[m.group(2)]}{m.group(3)}'
    return key


def official_from_model(model: torch.nn.Module, variant: str, family: str, depth: int,
                        head_dim: Optional[int] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """An official checkpoint (official names and shapes) carrying `model`'s values.

    Official tensors the model has no counterpart for (the init-cell extras that never run, e.g. the first
    cell's adjust_channel / u_Wk / u_bn) get `materialize` values.
    """
    ours = model.state_dict()
    shapes = official_shapes(variant, family, depth, head_dim=head_dim, num_classes=ours['fc.weight'].shape[0])
    mine = {k: official_to_ours(k) for k in shapes}
    noise = materialize({k: s for k, s in shapes.items() if mine[k] not in ours}, seed)
    return {k: ours[mine[k]].clone().reshape(s) if mine[k] in ours else noise[k] for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------
# CNNtention (docs/design/cnntention.md#cnn-conversion)
# ---------------------------------------------------------------------------------------------------------------

# trunk keys shared by both layouts (torchvision names)
CNNTENTION_TRUNK = ['conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer3.2.bn2.running_var', 'fc.weight']
# variant -> {official name under `att{i}.`: ours under `layer{i}.attn.`}; MHA's official key/query are swapped
CNNTENTION_KEYS = {
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


def cnntention_attention_shapes(variant: str, c: int) -> Shapes:
    """Official parameter names (those of `CNNTENTION_KEYS`) and shapes of one attention module of width `c`."""
    if variant == 'cbam':
        r = max(c // 16, 1)
        shapes = {'channel_attention.mlp.0.weight': (r, c), 'channel_attention.mlp.2.weight': (c, r),
                  'spatial_attention.conv.weight': (1, 2, 7, 7), 'spatial_attention.conv.bias': (1,)}
    else:  # 1x1 convs with bias, and the residual gate `weights`
        shapes = {n: (1,) if n == 'weights' else (c, c, 1, 1) if n.endswith('.weight') else (c,)
                  for n in CNNTENTION_KEYS[variant]}
    assert set(shapes) == set(CNNTENTION_KEYS[variant])
    return shapes


def cnntention_official_state_dict(name: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """An official-layout checkpoint: backbone keys as torchvision, attention under `att{i}`, gammas non-zero."""
    kind = name.rsplit('_', 1)[1]
    g = torch.Generator().manual_seed(seed)
    ours = timm.create_model('cifar_resnet20_basic').state_dict()
    sd = {k: (torch.randn(v.shape, generator=g) * 0.2 if v.is_floating_point() else v) for k, v in ours.items()}
    for k in sd:
        if k.endswith('running_var'):
            sd[k] = sd[k].abs() + 0.5
    for i, c in enumerate((16, 32, 64), start=1):
        for k, shape in cnntention_attention_shapes(kind, c).items():
            sd[f'att{i}.{k}'] = torch.randn(shape, generator=g) * 0.3
    return sd
