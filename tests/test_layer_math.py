"""The layer-attention modules compute the spec's formulas (checked against tests/_reference.py)."""
import math

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, MRLABase, MRLALight, eca_kernel_size, kcla_temperatures

from _reference import KCLAHistory, ref_kcla, ref_mrla_base, ref_mrla_light, ref_model_features


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial BN statistics and affines so every parameter shapes the output (incl. zero-init bn3)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.2
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """Max error relative to the tensor's scale: deep random nets reach large activations, where
    float32 summation-order differences exceed elementwise tolerances near zero crossings."""
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f'max abs error {err:.3g} > {tol:g} x scale {scale:.3g}'


def test_eca_kernel_sizes_match_spec_table():
    expected = {16: 3, 32: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in expected} == expected


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
        KCLA(64, head_dim=d, rebuild=True, drop_path=0.),  # mid-stage re-summary (R101 block 11 rule)
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
    from _reference import bn, depthwise3x3
    torch.testing.assert_close(out, x + torch.relu(bn(depthwise3x3(x, mod.v.weight), mod.norm, False)))


@pytest.mark.parametrize('name,size', [
    ('resnet50_kcla', 64),
    ('resnet50_mrlal', 64),
    ('resnet50_mrlab', 64),
    ('cifar_resnet20_kcla', 16),
    ('cifar_resnet20_mrlal', 16),
    ('cifar_resnet20_mrlab', 16),
    ('cifar_resnet20', 16),
])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_model_matches_reference_network(name, size, training):
    """Whole-network wiring: stem, strides, where history is re-summarised, cache resets per stage.

    float64, so that batch-statistics BN over tiny late-stage maps does not amplify rounding noise.
    """
    model = randomize_norms(timm.create_model(name, drop_path_rate=0.)).double().train(training)
    x = torch.randn(2, 3, size, size + 3, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_features(x)
        ref = ref_model_features(model, x, training)
    assert_close_scaled(out, ref, tol=1e-10)


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
    """Official code divides by a zero key norm here and returns NaN (spec Q7)."""
    model = timm.create_model('cifar_resnet20_kcla').eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_kcla_history_stays_float32_under_low_precision():
    """State accumulates in float32 (spec Q18) for a model cast to bfloat16 and under autocast."""
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
    """Official KCLA fails with dilation (spec Q11); here the projection follows the stage's stride."""
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


@pytest.mark.parametrize('name', ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab'])
def test_eval_mode_backward_matches_unfolded_path(name, monkeypatch):
    """Eval mode with autograd (e.g. saliency maps) differentiates the folded-BN path correctly."""
    from timm_layerattn.layers import LayerAttnBase
    model = randomize_norms(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(LayerAttnBase, '_can_fold_norm', lambda self: False)
    model(x).square().sum().backward()
    ref = [x.grad] + [p.grad for p in model.parameters()]
    for g, r in zip(grads, ref):
        assert_close_scaled(g, r, tol=1e-4)


@pytest.mark.parametrize('name', ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab'])
def test_inference_mode_matches_grad_mode(name):
    """The no-autograd path (in-place buffer reuse) computes the same values."""
    model = randomize_norms(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_chunked_depthwise_conv_equals_single_call():
    """Large CPU inputs go through the batch-chunked path; values and gradients are unchanged."""
    from timm_layerattn.layers._common import depthwise_conv3x3
    x = torch.randn(5, 8, 20, 20, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    ref = torch.nn.functional.conv2d(x, w, padding=1, groups=8)
    out = depthwise_conv3x3(x, w, split_above=1000, chunk=2000)  # forces chunks of 2 samples
    torch.testing.assert_close(out, ref)
    (gx, gw), (rx, rw) = torch.autograd.grad(out.sum(), (x, w)), torch.autograd.grad(ref.sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)  # summed over chunks: order differs
    xc = x.detach().contiguous(memory_format=torch.channels_last)  # not split: already fast
    torch.testing.assert_close(depthwise_conv3x3(xc, w, split_above=1000, chunk=2000), ref)
