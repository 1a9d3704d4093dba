"""CNNtention (spec cnntention.md): parameter counts, the three modules against the official maths written
with the official parameter names (so the key conversion, incl. MHA's key/query swap, is checked too)."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import timm_layerattn  # noqa: F401
from timm_layerattn.models.cnntention import checkpoint_filter_fn
from timm_layerattn.models.skeleton import PadShortcut
from timm_layerattn.tools.zoo import count_params

from _compile import assert_compiles_fullgraph

NAMES = ['cifar_resnet20_basic'] + [f'cifar_resnet20_basic_{k}' for k in ('selfatt', 'mha', 'cbam')]
# spec §4: 10 classes, 100 classes, MNIST (1 channel, 10 classes)
PARAMS = {
    'cifar_resnet20_basic': (269_722, 275_572, 269_434),
    'cifar_resnet20_basic_selfatt': (286_189, 292_039, 285_901),
    'cifar_resnet20_basic_mha': (291_677, 297_527, 291_389),
    'cifar_resnet20_basic_cbam': (270_691, 276_541, 270_403),
}


@pytest.mark.parametrize('name', NAMES)
def test_param_counts(name):
    counts = (count_params(timm.create_model(name, device='meta')),
              count_params(timm.create_model(name, num_classes=100, device='meta')),
              count_params(timm.create_model(name, in_chans=1, device='meta')))
    assert counts == PARAMS[name]


def conv(x, sd, name):
    return F.conv2d(x, sd[name + '.weight'], sd.get(name + '.bias'))


def ref_selfatt(sd, p, x):
    """Official SelfAtt: energy = query^T key over positions, softmax over keys, no scaling, gamma residual."""
    B, C, H, W = x.shape
    q = conv(x, sd, p + 'query').view(B, C, -1).permute(0, 2, 1)
    k = conv(x, sd, p + 'key').view(B, C, -1)
    v = conv(x, sd, p + 'value').view(B, C, -1)
    attn = torch.softmax(torch.bmm(q, k), dim=-1)
    out = torch.bmm(v, attn.permute(0, 2, 1)).view(B, C, H, W)
    return sd[p + 'weights'] * out + x


def ref_mha(sd, p, x, heads=8):
    """Official MultiHeadAtt: energy = key^T query / sqrt(d), softmax over the last (query-conv) axis."""
    B, C, H, W = x.shape
    d = C // heads
    a = conv(x, sd, p + 'key').view(B, heads, d, -1)
    b = conv(x, sd, p + 'query').view(B, heads, d, -1)
    v = conv(x, sd, p + 'val').view(B, heads, d, -1)
    attn = torch.softmax(a.transpose(2, 3) @ b / math.sqrt(d), dim=-1)
    out = (v @ attn.transpose(2, 3)).reshape(B, C, H, W)
    return sd[p + 'weights'] * conv(out, sd, p + 'linear') + x


def ref_cbam(sd, p, x):
    def mlp(z):
        return F.linear(F.relu(F.linear(z, sd[p + 'channel_attention.mlp.0.weight'])),
                        sd[p + 'channel_attention.mlp.2.weight'])
    f = x * torch.sigmoid(mlp(x.amax((2, 3))) + mlp(x.mean((2, 3))))[:, :, None, None]
    s = torch.cat([f.amax(1, keepdim=True), f.mean(1, keepdim=True)], 1)
    f = f * torch.sigmoid(F.conv2d(s, sd[p + 'spatial_attention.conv.weight'], sd[p + 'spatial_attention.conv.bias'],
                                   padding=3))
    return f + x


def _convs(c, names):
    shapes = {f'{n}.{t}': (c, c, 1, 1) if t == 'weight' else (c,) for n in names for t in ('weight', 'bias')}
    return {**shapes, 'weights': (1,)}


OFFICIAL = {  # our module -> (reference, official parameter names and shapes for width c)
    'selfatt': (ref_selfatt, lambda c: _convs(c, ('query', 'key', 'value'))),
    'mha': (ref_mha, lambda c: _convs(c, ('key', 'query', 'val', 'linear'))),
    'cbam': (ref_cbam, lambda c: {'channel_attention.mlp.0.weight': (max(c // 16, 1), c),
                                  'channel_attention.mlp.2.weight': (c, max(c // 16, 1)),
                                  'spatial_attention.conv.weight': (1, 2, 7, 7), 'spatial_attention.conv.bias': (1,)}),
}


def official_state_dict(name, seed=0):
    """An official-layout checkpoint: backbone keys as torchvision, attention under `att{i}`, gammas non-zero."""
    kind = name.rsplit('_', 1)[1]
    g = torch.Generator().manual_seed(seed)
    ours = timm.create_model('cifar_resnet20_basic').state_dict()
    sd = {k: (torch.randn(v.shape, generator=g) * 0.2 if v.is_floating_point() else v) for k, v in ours.items()}
    for k in sd:
        if k.endswith('running_var'):
            sd[k] = sd[k].abs() + 0.5
    for i, c in enumerate((16, 32, 64), start=1):
        for k, shape in OFFICIAL[kind][1](c).items():
            sd[f'att{i}.{k}'] = torch.randn(shape, generator=g) * 0.3
    return sd


@pytest.mark.parametrize('name', NAMES[1:])
def test_modules_match_official_maths_through_key_conversion(name, tmp_path):
    kind = name.rsplit('_', 1)[1]
    ref = OFFICIAL[kind][0]
    official = official_state_dict(name)
    save_file(official, tmp_path / 'official.safetensors')
    # the real loading path: timm's load_pretrained applies our filter, strict
    overlay = dict(file=str(tmp_path / 'official.safetensors'))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    for i, c in enumerate((16, 32, 64), start=1):
        x = torch.randn(2, c, 8, 6)
        with torch.no_grad():
            out, _ = model.get_submodule(f'layer{i}.attn')(x, [], [])
        torch.testing.assert_close(out, ref(official, f'att{i}.', x), rtol=1e-5, atol=1e-5)
    if kind == 'mha':  # the literal (unswapped) reading is a different function: the test can tell
        swapped = dict(official)
        for t in ('weight', 'bias'):
            key, query = f'att1.key.{t}', f'att1.query.{t}'
            swapped[key], swapped[query] = official[query], official[key]
        x = torch.randn(2, 16, 8, 6)
        with torch.no_grad():
            assert (model.layer1.attn(x, [], [])[0] - ref_mha(swapped, 'att1.', x)).abs().max() > 1e-3
    # idempotent on our own layout
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


@pytest.mark.parametrize('name', NAMES)
def test_every_model_forward_backward_features(name):
    model = timm.create_model(name, num_classes=5)
    for m in model.modules():  # open the gates, so the attention path shapes the output
        if hasattr(m, 'gamma'):
            m.gamma.data.fill_(0.5)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert [f['num_chs'] for f in model.feature_info] == [16, 16, 32, 64]
    assert [f['reduction'] for f in model.feature_info] == [1, 1, 2, 4]
    model.eval()
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        # level i is the stage output *after* its attention module (spec §8)
        y = model.maxpool(model.forward_stem(x))
        for blk in [b for n, b in model.layer1.named_children() if n.isdigit()]:
            y = blk(y, [], [])[0]
        if hasattr(model.layer1, 'attn'):
            y = model.layer1.attn(y, [], [])[0]
        torch.testing.assert_close(feats[1], y)


def test_option_a_shortcut():
    x = torch.randn(2, 16, 5, 5)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 3, 3)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert not any('downsample' in k for k in timm.create_model('cifar_resnet20_basic').state_dict())


def test_kwargs_and_errors():
    assert count_params(timm.create_model('cifar_resnet20_basic_cbam', cbam_reduction=8, device='meta')) == \
        269_722 + sum(2 * c * (c // 8) + 99 for c in (16, 32, 64))
    model = timm.create_model('cifar_resnet20_basic_mha', att_heads=4)
    assert model.layer2.attn.num_heads == 4
    with pytest.raises(TypeError, match='att_heads'):
        timm.create_model('cifar_resnet20_basic_selfatt', att_heads=4)
    with pytest.raises(ValueError, match='divisible'):
        timm.create_model('cifar_resnet20_basic_mha', att_heads=5)
    with pytest.raises(AssertionError, match='3 input channels'):
        timm.create_model('cifar_resnet20_basic_cbam')(torch.randn(1, 1, 32, 32))


def test_scripting_and_compile():
    model = timm.create_model('cifar_resnet20_basic_mha').eval()
    model.layer1.attn.gamma.data.fill_(1.)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref)
    assert_compiles_fullgraph(model, x, ref)
