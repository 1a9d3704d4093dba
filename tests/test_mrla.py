"""MRLA-light and MRLA-base (docs/design/layer_attention.md#la-mrla-light-forward, #la-mrla-base-forward): the
modules against tests/_reference.py, whole networks, the fused CPU kernels against the PyTorch path, parameter
counts, and the official checkpoints (tests/_official.py) converted and loaded. The `#la-...` anchors are sections
of docs/design/layer_attention.md."""
import pytest
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.layers import MRLABase, MRLALight

from _layer_attn import (
    SIZES, check_imagenet_layout_counts, check_kernels_match_pytorch, check_official_parity, check_official_r50_loads,
    check_reference_network, check_strict_conversion, kernel_calls, n_params, randomize_norms)
from _official import bn_shapes, numel, official_shapes
from _reference import bn, depthwise3x3, ref_mrla_base, ref_mrla_light


# ---------------------------------------------------------------------------------------------------------------
# The modules and the networks against the reference (#la-mrla-light-forward, #la-mrla-base-forward)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_mrla_light_formula(training):
    mod = randomize_norms(MRLALight(64, head_dim=16)).train(training)
    x, r = torch.randn(2, 64, 6, 5).relu(), torch.randn(2, 64, 6, 5)
    out, state = mod(x, r, [])
    assert state == []
    torch.testing.assert_close(out, ref_mrla_light(mod, x, r, training), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_mrla_base_softmax_over_cached_keys(training):
    mods = [randomize_norms(MRLABase(32, head_dim=8, first_in_stage=i == 0)).train(training) for i in range(4)]
    state, keys, values = [], [], []
    for i, mod in enumerate(mods):
        x = torch.randn(2, 32, 5, 6).relu()
        out, state = mod(x, x, state)
        ref, keys, values = ref_mrla_base(mod, x, keys, values, training)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert state[0].shape == (2, i + 1, 32) and len(state) == i + 2
    # a new stage discards the cache
    first = randomize_norms(MRLABase(32, head_dim=8, first_in_stage=True)).train(training)
    x = torch.randn(2, 32, 5, 6).relu()
    out, state = first(x, x, state)
    torch.testing.assert_close(out, ref_mrla_base(first, x, [], [], training)[0], rtol=1e-5, atol=1e-5)
    assert len(state) == 2


def test_mrla_base_first_block_output_is_value_path():
    """With one token the softmax weight is exactly 1: out = x + relu(BN(DW3(x)))."""
    mod = randomize_norms(MRLABase(16, head_dim=4, first_in_stage=True)).eval()
    x = torch.randn(1, 16, 4, 4)
    out, _ = mod(x, x, [])
    torch.testing.assert_close(out, x + torch.relu(bn(depthwise3x3(x, mod.v.weight), mod.norm, False)))


@pytest.mark.parametrize('name,size', [
    ('resnet50_mrlal', 64),
    ('resnet50_mrlab', 64),
    ('cifar_resnet20_mrlal', 16),
    ('cifar_resnet20_mrlab', 16),
])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_model_matches_reference_network(name, size, training):
    """Whole-network wiring: stem, strides, where history is re-summarised, cache resets per stage.

    float64, so that batch-statistics BN over tiny late-stage maps does not amplify rounding noise.
    """
    check_reference_network(name, size, training)


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU kernels (timm_layerattn/layers/csrc) against the PyTorch path; `ops` is in conftest.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('hw', SIZES, ids=str)
def test_mrla_light_kernel_formula(ops, hw):
    mod = randomize_norms(MRLALight(64, head_dim=16)).eval()
    x, r = torch.randn(2, 64, *hw).relu(), torch.randn(2, 64, *hw)
    ref = ref_mrla_light(mod, x, r, False)
    with torch.no_grad():
        assert kernel_calls(lambda: mod(x.clone(), r, [])) == 1
        out, state = mod(x, r, [])
    assert state == [] and out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('hw', SIZES, ids=str)
def test_mrla_base_kernel_softmax_over_cached_keys(ops, hw):
    mods = [randomize_norms(MRLABase(32, head_dim=8, first_in_stage=i == 0)).eval() for i in range(4)]
    mods.append(randomize_norms(MRLABase(32, head_dim=8, first_in_stage=True)).eval())  # a new stage
    state, keys, values = [], [], []
    for i, mod in enumerate(mods):
        x = torch.randn(2, 32, *hw).relu()
        if mod.first_in_stage:
            keys, values = [], []
        ref, keys, values = ref_mrla_base(mod, x, keys, values, False)
        with torch.no_grad():
            assert kernel_calls(lambda: mod(x.clone(), x, list(state))) == 1
            out, state = mod(x, x, state)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert state[0].shape == (2, len(values), 32) and len(state) == len(values) + 1
        for v, r in zip(state[1:], values):
            torch.testing.assert_close(v, r, rtol=1e-5, atol=1e-5)


KERNEL_MODELS = [('cifar_resnet20_mrlal', 32), ('cifar_resnet20_mrlab', 32), ('resnet50_mrlal', 67),
                 ('resnet50_mrlab', 67)]


@pytest.mark.parametrize('name,size', KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_models_with_kernels_match_pytorch_path(ops, name, size):
    """Whole networks (every block, stage changes, KCLA re-summaries, MRLA-B caches) give the same logits
    and features with and without the kernels, and every attention block runs its kernel."""
    check_kernels_match_pytorch(name, size)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (#la-param-counts)
# ---------------------------------------------------------------------------------------------------------------


# Parameter counts of the official code (docs/design/layer_attention.md#la-param-counts).
PARAMS_IMAGENET = {
    'resnet50_mrlal': 25_738_452,
    'resnet101_mrlal': 44_939_646,
    'resnet50_mrlab': 25_742_580,
    'resnet101_mrlab': 44_926_366,
}
PARAMS_CIFAR = {  # (10 classes, 100 classes)
    'cifar_resnet20_mrlal': (231_182, 254_312),
    'cifar_resnet56_mrlal': (623_734, 646_864),
    'cifar_resnet110_mrlal': (1_212_562, 1_235_692),
    'cifar_resnet20_mrlab': (230_286, 253_416),
    'cifar_resnet56_mrlab': (621_046, 644_176),
    'cifar_resnet110_mrlab': (1_207_186, 1_230_316),
}


@pytest.mark.parametrize('name,expected', PARAMS_IMAGENET.items())
def test_imagenet_param_counts_match_official(name, expected):
    assert n_params(name) == expected


@pytest.mark.parametrize('name,expected', PARAMS_CIFAR.items())
def test_cifar_param_counts_match_official(name, expected):
    assert n_params(name) == expected[0]
    assert n_params(name, num_classes=100) == expected[1]


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints: layout sizes, conversion, parity with the official forward, loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('family,depth,head_dim,entries,total', [
    ('mrla_light', 50, None, 464, 25_738_452),
    ('mrla_light', 101, None, None, 44_939_646),
    ('mrla_base', 50, None, 460, 25_742_580),
    ('mrla_base', 101, None, None, 44_926_366),
])
def test_official_imagenet_layout_matches_spec_counts(family, depth, head_dim, entries, total):
    check_imagenet_layout_counts(family, depth, head_dim, entries, total)


@pytest.mark.parametrize('depth,counts', [
    (20, {'mrla_light': 231_182, 'mrla_base': 230_286}),
    (56, {'mrla_light': 623_734, 'mrla_base': 621_046}),
    (110, {'mrla_light': 1_212_562, 'mrla_base': 1_207_186}),
])
def test_official_cifar_layout_matches_spec_counts(depth, counts):
    for family, total in counts.items():
        assert numel(official_shapes('cifar', family, depth)) == total, family


@pytest.mark.parametrize('model_name,family', [
    ('cifar_resnet20_mrlal', 'mrla_light'),
    ('cifar_resnet20_mrlab', 'mrla_base'),
])
def test_cifar_parity(model_name, family):
    depth = int(model_name.split('_')[1][len('resnet'):])
    check_official_parity(model_name, 'cifar', family, depth, size=32)


@pytest.mark.parametrize('model_name,family,depth,head_dim', [
    ('resnet50_mrlal', 'mrla_light', 50, None),
    ('resnet50_mrlab', 'mrla_base', 50, None),
])
def test_imagenet_parity(model_name, family, depth, head_dim):
    check_official_parity(model_name, 'imagenet', family, depth, size=64, head_dim=head_dim)


@pytest.mark.parametrize('model_name,family,depth', [
    ('resnet101_mrlal', 'mrla_light', 101),
    ('resnet101_mrlab', 'mrla_base', 101),
    ('cifar_resnet56_mrlal', 'mrla_light', 56),
    ('cifar_resnet56_mrlab', 'mrla_base', 56),
    ('cifar_resnet110_mrlal', 'mrla_light', 110),
    ('cifar_resnet110_mrlab', 'mrla_base', 110),
])
def test_strict_conversion_other_architectures(model_name, family, depth):
    """Every remaining official architecture converts and fits the model exactly (checked on the meta device)."""
    check_strict_conversion(model_name, family, depth)


def test_mrla_base22_variant_is_refused():
    """Official `resnet_mrla_base22.py` (joyfang1106/MRLA; 7x7 stem, no ReLU after BN_mrla) is detected by its
    stem shape (#la-mrla-base-variants)."""
    shapes = official_shapes('imagenet', 'mrla_base', 50)
    for k in [k for k in shapes if k.startswith(('conv1.', 'bn1.'))]:
        del shapes[k]
    shapes['conv1.weight'] = (64, 3, 7, 7)
    shapes.update(bn_shapes('bn1.', 64))
    official = {k: torch.empty(v, device='meta') for k, v in shapes.items()}
    with pytest.raises(UserError, match='resnet_mrla_base22'):
        convert_official(official, 'resnet50_mrlab')


@pytest.mark.parametrize('name,variant,entries', [
    ('resnet50_mrlal', 'mrlal', 464), ('resnet50_mrlab', 'mrlab', 460)])
def test_official_imagenet_r50_checkpoint_loads_strictly(name, variant, entries):
    check_official_r50_loads(name, variant, entries)
