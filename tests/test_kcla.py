"""KCLA (docs/design/layer_attention.md#la-kcla-forward): the cell against tests/_reference.py, whole networks,
history rules, the fused CPU kernel against the PyTorch path, parameter counts, and the official checkpoints
(tests/_official.py) converted and loaded. The `#la-...` anchors are sections of docs/design/layer_attention.md."""
import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.checkpoints import CheckpointMismatchError
from timm_layerattn.convert import convert_official_with_report
from timm_layerattn.families import family_of
from timm_layerattn.layers import KCLA, kcla_temperatures
from timm_layerattn.models.resnet_la import checkpoint_filter_fn

from _layer_attn import (
    SIZES, check_imagenet_layout_counts, check_kernels_match_pytorch, check_official_parity, check_official_r50_loads,
    check_reference_network, check_strict_conversion, half, kernel_calls, n_params, randomize_norms)
from _official import (
    BN_FIELDS, materialize, numel, official_cifar20, official_from_model, official_shapes, official_to_ours)
from _reference import ref_kcla


# ---------------------------------------------------------------------------------------------------------------
# The cell and the networks against the reference (#la-kcla-forward, #la-kcla-rebuild)
# ---------------------------------------------------------------------------------------------------------------


def test_kcla_temperatures_match_spec_values():
    s = kcla_temperatures(4).reciprocal()
    torch.testing.assert_close(s, torch.tensor([0.7, 0.8879, 1.1262, 1.4286]), atol=1e-4, rtol=0)
    s8 = kcla_temperatures(8).reciprocal()
    torch.testing.assert_close(
        s8, torch.tensor([0.7, 0.7751, 0.8582, 0.9503, 1.0523, 1.1652, 1.2902, 1.4286]), atol=1e-4, rtol=0)
    assert kcla_temperatures(1).reciprocal().item() == pytest.approx(0.7)


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_kcla_recurrent_state_equals_explicit_weighted_sum(training):
    """A chain of KCLA cells (same stage, then a stage change with re-summary) equals the reference
    that keeps every earlier block output and forms sum_j alpha_j x_j / (sum_j alpha_j + 1e-3)."""
    torch.manual_seed(0)
    d = 8
    cells = [
        KCLA(32, head_dim=d, drop_path=0.),
        KCLA(32, head_dim=d, drop_path=0.),
        KCLA(32, head_dim=d, drop_path=0.),
        KCLA(64, head_dim=d, in_channels=32, rebuild=True, history_stride=2, drop_path=0.),
        KCLA(64, head_dim=d, drop_path=0.),
        KCLA(64, head_dim=d, rebuild=True, drop_path=0.),  # mid-stage re-summary (as ResNet-101 layer3.11)
        KCLA(64, head_dim=d, drop_path=0.),
    ]
    for c in cells:
        randomize_norms(c)
        torch.nn.init.normal_(c.v.weight, std=0.3)
        c.train(training)
    inputs = [torch.randn(3, 32, 9, 7).relu() for _ in range(3)] + [torch.randn(3, 64, 5, 4).relu() for _ in range(4)]

    state, history = [], None
    for cell, x in zip(cells, inputs):
        out, state = cell(x, x, state)
        ref, history = ref_kcla(cell, x, history, training)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # carried state: normalised history and the weight sum
        g = cell.num_heads
        torch.testing.assert_close(state[0], history.normalised(1e-3, g), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[1], sum(w for w, _ in history.tokens), rtol=1e-5, atol=1e-4)
        assert state[0].dtype == torch.float32 and state[1].dtype == torch.float32


@pytest.mark.parametrize('name,size', [
    ('resnet50_kcla', 64),
    ('cifar_resnet20_kcla', 16),
])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_model_matches_reference_network(name, size, training):
    """Whole-network wiring: stem, strides, where history is re-summarised, cache resets per stage.

    float64, so that batch-statistics BN over tiny late-stage maps does not amplify rounding noise.
    """
    check_reference_network(name, size, training)


def test_resnet101_kcla_resummarises_history_at_block_11_of_layer3():
    model = timm.create_model('resnet101_kcla', device='meta')
    rebuild = [f'{s}.{i}' for s, stage in zip(model.stage_names, model.stages())
               for i, blk in enumerate(stage) if blk.attn.hist_norm is not None]
    assert rebuild == ['layer2.0', 'layer3.0', 'layer3.11', 'layer4.0']
    # the width-changing projection exists only where the width changes
    projs = [f'{s}.{i}' for s, stage in zip(model.stage_names, model.stages())
             for i, blk in enumerate(stage) if blk.attn.hist_proj is not None]
    assert projs == ['layer2.0', 'layer3.0', 'layer4.0']


def test_kcla_all_zero_input_is_finite():
    """Official code divides by a zero key norm here and returns NaN (docs/design/layer_attention.md#la-key-norm-eps)."""
    model = timm.create_model('cifar_resnet20_kcla').eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_kcla_history_stays_float32_under_low_precision():
    """State accumulates in float32 (docs/design/layer_attention.md#la-float32-state) for a model cast to
    bfloat16 and under autocast."""
    cell = KCLA(32, head_dim=8).eval()
    x = torch.rand(2, 32, 4, 4) * 50
    _, state = cell.to(torch.bfloat16)(x.to(torch.bfloat16), x, [])
    out, state = cell(x.to(torch.bfloat16), x, state)
    assert out.dtype == torch.bfloat16 and state[0].dtype == torch.float32 and state[1].dtype == torch.float32
    model = timm.create_model('cifar_resnet20_kcla').eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(y).all()
    with torch.no_grad():
        y16 = model.to(torch.bfloat16)(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()


def test_kcla_branch_drop_path_default_and_override():
    model = timm.create_model('cifar_resnet20_kcla')
    assert all(blk.attn.drop_path.drop_prob == 0.2 for st in model.stages() for blk in st)
    model = timm.create_model('cifar_resnet20_kcla', drop_path_rate=0.05)
    assert all(blk.attn.drop_path.drop_prob == 0.05 for st in model.stages() for blk in st)
    model = timm.create_model('cifar_resnet20_mrlal')
    assert all(isinstance(blk.attn.drop_path, torch.nn.Identity) for st in model.stages() for blk in st)
    # the branch is stochastic in training, deterministic in eval
    model = timm.create_model('cifar_resnet20_kcla', drop_path_rate=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_kcla_dilated_stages_use_stride_one_history_projection():
    """Official KCLA fails with dilation (docs/design/layer_attention.md#la-dilation); here the projection
    follows the stage's stride."""
    model = timm.create_model('resnet50_kcla', output_stride=8).eval()
    strides = [blk.attn.hist_proj.stride for st in model.stages() for blk in st if blk.attn.hist_proj is not None]
    assert strides == [(2, 2), (1, 1), (1, 1)]
    feats = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 8, 8]


def test_norm_d_is_a_buffer_not_a_parameter():
    model = timm.create_model('resnet50_kcla', device='meta')
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith('norm_d') for n in names)
    buffers = {n: b for n, b in model.named_buffers() if n.endswith('norm_d')}
    assert len(buffers) == 16 and 'layer4.2.attn.norm_d' in buffers
    assert buffers['layer4.2.attn.norm_d'].shape == (2048 // 32,)


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU kernel (timm_layerattn/layers/csrc) against the PyTorch path; `ops` is in conftest.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('hw', SIZES, ids=str)
def test_kcla_kernel_chain_equals_explicit_weighted_sum(ops, hw):
    """The kernel path of a KCLA chain (first block, same stage, stage change with re-summary, mid-stage
    re-summary) against the reference that keeps every earlier block output; in place on x."""
    d = 8
    cells = [
        KCLA(32, head_dim=d, drop_path=0.),
        KCLA(32, head_dim=d, drop_path=0.),
        KCLA(64, head_dim=d, in_channels=32, rebuild=True, history_stride=2, drop_path=0.),
        KCLA(64, head_dim=d, drop_path=0.),
        KCLA(64, head_dim=d, rebuild=True, drop_path=0.),
        KCLA(64, head_dim=d, drop_path=0.),
    ]
    for c in cells:
        randomize_norms(c).eval()
        torch.nn.init.normal_(c.v.weight, std=0.3)
    inputs = [torch.randn(3, 32, *hw).relu() for _ in range(2)]
    inputs += [torch.randn(3, 64, *half(hw)).relu() for _ in range(4)]
    state, history = [], None
    for cell, x in zip(cells, inputs):
        ref, history = ref_kcla(cell, x, history, False)
        x_in = x.clone()
        with torch.no_grad():
            assert kernel_calls(lambda: cell(x_in.clone(), x_in, [t.clone() for t in state])) == 1
            out, state = cell(x_in, x_in, state)
        assert out.data_ptr() == x_in.data_ptr()  # the block output is updated in place
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[0], history.normalised(1e-3, cell.num_heads), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[1], sum(w for w, _ in history.tokens), rtol=1e-5, atol=1e-4)


KERNEL_MODELS = [('cifar_resnet20_kcla', 32), ('cifar_resnet56_kcla', 11), ('resnet50_kcla', 67)]


@pytest.mark.parametrize('name,size', KERNEL_MODELS, ids=[n for n, _ in KERNEL_MODELS])
def test_models_with_kernels_match_pytorch_path(ops, name, size):
    """Whole networks (every block, stage changes, KCLA re-summaries, MRLA-B caches) give the same logits
    and features with and without the kernels, and every attention block runs its kernel."""
    check_kernels_match_pytorch(name, size)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (#la-param-counts)
# ---------------------------------------------------------------------------------------------------------------


# Parameter counts of the official code (docs/design/layer_attention.md#la-param-counts). KCLA: the official
# count minus its frozen `norm_d` (a buffer here) and minus the init-cell tensors that never run (not created
# here).
PARAMS_IMAGENET = {
    'resnet50_kcla': 25_812_138 - 4_613,  # head dim 32 (paper); 4,613 unused official tensors
    'resnet101_kcla': 45_031_769 - 4_613 - 16_384,  # + layer3.attention.11.adjust_channel
}
PARAMS_KCLA_HEAD64 = {'resnet50_kcla': 25_850_133, 'resnet101_kcla': 45_040_324}  # "used", #la-params-imagenet
PARAMS_CIFAR = {  # (10 classes, 100 classes)
    'cifar_resnet20_kcla': (235_507 - 56 - 643, 258_637 - 56 - 643),
    'cifar_resnet56_kcla': (627_723 - 168 - 643, 650_853 - 168 - 643),
    'cifar_resnet110_kcla': (1_216_047 - 336 - 643, 1_239_177 - 336 - 643),
}


@pytest.mark.parametrize('name,expected', PARAMS_IMAGENET.items())
def test_imagenet_param_counts_match_official(name, expected):
    assert n_params(name) == expected


@pytest.mark.parametrize('name,expected', PARAMS_KCLA_HEAD64.items())
def test_kcla_released_code_head_dim(name, expected):
    assert n_params(name, head_dim=64) == expected


@pytest.mark.parametrize('name,expected', PARAMS_CIFAR.items())
def test_cifar_param_counts_match_official(name, expected):
    assert n_params(name) == expected[0]
    assert n_params(name, num_classes=100) == expected[1]


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints: layout sizes, conversion, parity with the official forward, loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('family,depth,head_dim,entries,total', [
    ('kcla', 50, 64, 508, 25_859_078),
    ('kcla', 101, 64, None, 45_082_309),
    ('kcla', 50, 32, None, 25_812_610),
    ('kcla', 101, 32, None, 45_032_785),
])
def test_official_imagenet_layout_matches_spec_counts(family, depth, head_dim, entries, total):
    check_imagenet_layout_counts(family, depth, head_dim, entries, total)


@pytest.mark.parametrize('depth,counts', [
    (20, {'kcla': 235_507}),
    (56, {'kcla': 627_723}),
    (110, {'kcla': 1_216_047}),
])
def test_official_cifar_layout_matches_spec_counts(depth, counts):
    for family, total in counts.items():
        assert numel(official_shapes('cifar', family, depth)) == total, family


@pytest.mark.parametrize('model_name,family', [
    ('cifar_resnet20_kcla', 'kcla'),
    ('cifar_resnet110_kcla', 'kcla'),  # 12 blocks per stage: CIFAR re-inits at block 0 only
])
def test_cifar_parity(model_name, family):
    depth = int(model_name.split('_')[1][len('resnet'):])
    check_official_parity(model_name, 'cifar', family, depth, size=32)


@pytest.mark.parametrize('model_name,family,depth,head_dim', [
    ('resnet50_kcla', 'kcla', 50, 32),
    ('resnet101_kcla', 'kcla', 101, 32),  # re-init cell at layer3 block 11, without the adjust conv
])
def test_imagenet_parity(model_name, family, depth, head_dim):
    check_official_parity(model_name, 'imagenet', family, depth, size=64, head_dim=head_dim)


def test_kcla_released_head_dim_64():
    """The released ImageNet KCLA code uses head dim 64: refused for the default model, loads with head_dim=64."""
    official = materialize(official_shapes('imagenet', 'kcla', 50, head_dim=64))
    with pytest.raises(UserError, match=r'head dim is 64.*head_dim=64'):
        convert_official(official, 'resnet50_kcla')
    check_official_parity('resnet50_kcla', 'imagenet', 'kcla', 50, size=64, head_dim=64, model_head_dim=64)


@pytest.mark.parametrize('model_name,family,depth', [
    ('cifar_resnet56_kcla', 'kcla', 56),
])
def test_strict_conversion_other_architectures(model_name, family, depth):
    """Every remaining official architecture converts and fits the model exactly (checked on the meta device)."""
    check_strict_conversion(model_name, family, depth)


def test_known_unused_kcla_parameters_are_dropped_with_a_note(caplog):
    official = materialize(official_shapes('imagenet', 'kcla', 101, head_dim=32))
    with caplog.at_level('INFO', logger='timm_layerattn.convert'):
        _, report = convert_official_with_report(official, 'resnet101_kcla')
    first_cell = ['layer1.attention.0.adjust_channel.weight', 'layer1.attention.0.u_Wk.weight'] + [
        f'layer1.attention.0.u_bn.{n}' for n in BN_FIELDS]
    assert sorted(report.dropped) == sorted(first_cell + ['layer3.attention.11.adjust_channel.weight'])
    assert 'never run' in caplog.text and 'layer3.attention.11.adjust_channel.weight' in caplog.text


def test_unexpected_kcla_extra_outside_known_cells_is_an_error():
    sd = official_cifar20('kcla')
    sd['stages.1.1.kcla.u_Wk.weight'] = torch.zeros(1, 1, 5)  # not an init cell in the official CIFAR code
    with pytest.raises(UserError, match=r'stages\.1\.1\.kcla\.u_Wk\.weight'):
        convert_official(sd, 'cifar_resnet20_kcla')


def test_timm_and_convert_take_the_same_tensors_from_an_official_file(tmp_path):
    """One never-run rule (#la-unused-modules): an official KCLA file loaded through timm's entry point and
    converted with `convert_official` gives identical tensors, and the same official keys are dropped."""
    official = official_cifar20('kcla')
    path = tmp_path / 'kcla20.pth'
    torch.save({'epoch': 299, 'state_dict': {'module.' + k: v for k, v in official.items()}}, path)
    converted, report = convert_official_with_report(torch.load(path), 'cifar_resnet20_kcla')
    loaded = timm.create_model(
        'cifar_resnet20_kcla', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    assert list(loaded) == list(converted)
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())
    dropped_by_timm = [k for k in official if official_to_ours(k) not in loaded]
    assert dropped_by_timm == report.dropped and len(report.dropped) == 7  # the first cell's re-init extras


def test_timm_refuses_a_kcla_extra_outside_known_cells_as_convert_does(tmp_path):
    """A re-init module the model lacks outside the known never-run cells runs in the official network: timm's
    entry point keeps the key, and its strict load names it (as `convert_official` does)."""
    sd = official_cifar20('kcla')
    sd['stages.1.1.kcla.u_Wk.weight'] = torch.zeros(1, 1, 5)
    path = tmp_path / 'kcla20_extra.pth'
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match=r'unexpected key.*layer2\.1\.attn\.hist_k\.weight'):
        timm.create_model('cifar_resnet20_kcla', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_timm_filter_and_convert_drop_the_same_keys_of_resnet101():
    """ResNet-101 also has a re-init cell of unchanged width (layer3.11, whose adjust_channel never runs): the
    model's checkpoint filter (timm's `checkpoint_filter_fn`) keeps and drops what `convert_official` does."""
    official = materialize(official_shapes('imagenet', 'kcla', 101, head_dim=32))
    converted, report = convert_official_with_report(official, 'resnet101_kcla')
    model = timm.create_model('resnet101_kcla', device='meta')
    filtered = family_of('resnet101_kcla').rules.filter(official, model)  # what timm's build is given
    assert set(filtered) == set(converted)
    assert all(torch.equal(filtered[k], v) for k, v in converted.items())
    assert [k for k in official if official_to_ours(k) not in filtered] == report.dropped
    assert 'layer3.attention.11.adjust_channel.weight' in report.dropped


@pytest.mark.parametrize('name,variant,entries', [
    ('resnet50_kcla', 'kcla', 508)])
def test_official_imagenet_r50_checkpoint_loads_strictly(name, variant, entries):
    check_official_r50_loads(name, variant, entries)


def test_official_kcla_cifar_checkpoint_loads_strictly():
    model = timm.create_model('cifar_resnet20_kcla').eval()
    # the first cell's init modules exist (unused) in the official model: C=64, d=16 -> [64, 8, 1, 1]
    official = official_from_model(model, 'cifar', 'kcla', 20)
    converted = checkpoint_filter_fn(official, model)
    fresh = timm.create_model('cifar_resnet20_kcla').eval()
    fresh.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
