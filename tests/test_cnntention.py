"""CNNtention (docs/design/cnntention.md#cnn-modules): parameter counts, the three modules against the official
maths written with the official parameter names (tests/_reference.py, on checkpoints of tests/_official.py), so
the key conversion, incl. MHA's key/query swap, is checked too."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_layerattn  # noqa: F401
from timm_layerattn.models.cnntention import checkpoint_filter_fn
from timm_layerattn.models.resnet_blocks import PadShortcut
from timm_layerattn.tools.zoo import count_params

from _compile import assert_compiles_fullgraph
from _official import cnntention_official_state_dict
from _reference import ref_cbam, ref_mha, ref_selfatt

NAMES = ['cifar_resnet20_basic'] + [f'cifar_resnet20_basic_{k}' for k in ('selfatt', 'mha', 'cbam')]
# docs/design/cnntention.md#cnn-param-counts: 10 classes, 100 classes, MNIST (1 channel, 10 classes)
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


REFS = {'selfatt': ref_selfatt, 'mha': ref_mha, 'cbam': ref_cbam}  # our module -> reference maths


@pytest.mark.parametrize('name', NAMES[1:])
def test_modules_match_official_maths_through_key_conversion(name, tmp_path):
    kind = name.rsplit('_', 1)[1]
    ref = REFS[kind]
    official = cnntention_official_state_dict(name)
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
        # level i is the stage output *after* its attention module (docs/design/cnntention.md#cnn-package)
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
