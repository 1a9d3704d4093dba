"""The layer-attention modules compute the formulas of docs/design/layer_attention.md (checked against
tests/_reference.py), and their PyTorch paths agree."""
import functools
import math

from typing import List, Tuple

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, LayerAttnBase, MRLABase, MRLALight, eca_kernel_size, kcla_temperatures
from timm_layerattn.layers import native

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


CHAINS = ['kcla', 'mrla_base', 'mrla_light']


def layer_attn_chain(kind: str) -> List[Tuple[LayerAttnBase, torch.Tensor, torch.Tensor]]:
    """Eval-mode modules of one strategy with their inputs `(module, x, shortcut)`, covering every state case:
    KCLA first block, same stage, width change with re-summary and mid-stage re-summary; MRLA-B first block,
    growing cache and a new stage. Drop path is set (identity in eval)."""
    torch.manual_seed(0)
    d = 8
    if kind == 'kcla':
        mods = [
            KCLA(32, head_dim=d, drop_path=0.1),
            KCLA(32, head_dim=d, drop_path=0.1),
            KCLA(64, head_dim=d, in_channels=32, rebuild=True, history_stride=2, drop_path=0.1),
            KCLA(64, head_dim=d, drop_path=0.1),
            KCLA(64, head_dim=d, rebuild=True, drop_path=0.1),
        ]
        shapes = [(3, 32, 9, 7)] * 2 + [(3, 64, 5, 4)] * 3
    elif kind == 'mrla_base':
        mods = [MRLABase(32, head_dim=d, first_in_stage=first, drop_path=0.1)
                for first in (True, False, False, True, False)]
        shapes = [(2, 32, 5, 6)] * len(mods)
    else:
        mods = [MRLALight(64, head_dim=16, drop_path=0.1) for _ in range(2)]
        shapes = [(2, 64, 6, 5)] * len(mods)
    for m in mods:
        randomize_norms(m).eval()
        torch.nn.init.normal_(m.v.weight, std=0.3)
    return [(m, torch.randn(s).relu(), torch.randn(s)) for m, s in zip(mods, shapes)]


def run_path(
        mod: LayerAttnBase,
        path: str,
        x: torch.Tensor,
        shortcut: torch.Tensor,
        state: List[torch.Tensor],
        grad: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One path (`reference`, `folded`, `native`) of `mod` on copies of the inputs (paths may work in place)."""
    with torch.set_grad_enabled(grad):
        out, new_state = getattr(mod, f'forward_{path}')(x.clone(), shortcut.clone(), [t.clone() for t in state])
    return out.detach(), [t.detach() for t in new_state]


def assert_same_step(a: Tuple[torch.Tensor, List[torch.Tensor]], b: Tuple[torch.Tensor, List[torch.Tensor]]):
    """Equal block outputs and carried states."""
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert len(a[1]) == len(b[1])
    for s, r in zip(a[1], b[1]):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', CHAINS)
def test_eval_paths_agree(kind):
    """In eval mode the folded path, with autograd off (in place) and on, equals the reference path (which
    applies the eval-mode BatchNorm as a module), in output and carried state, block by block."""
    state = []
    for mod, x, r in layer_attn_chain(kind):
        ref = run_path(mod, 'reference', x, r, state)
        assert_same_step(run_path(mod, 'folded', x, r, state), ref)
        assert_same_step(run_path(mod, 'folded', x, r, state, grad=True), ref)
        state = ref[1]


def test_forward_is_defined_once_in_the_base():
    """`LayerAttnBase.forward` is the one dispatch point: the strategies implement only the paths."""
    for cls in (KCLA, MRLALight, MRLABase):
        assert [k for k in cls.__mro__ if 'forward' in vars(k)] == [LayerAttnBase, torch.nn.Module]
        assert all(f'forward_{p}' in vars(cls) for p in ('reference', 'folded', 'native'))


def record_paths(mod: LayerAttnBase) -> List[str]:
    """Patch `mod`'s path methods to log which one each call takes."""
    taken = []
    for path in ('reference', 'folded', 'native'):
        def wrapped(*args, _path=path, _fn=getattr(mod, f'forward_{path}')):
            taken.append(_path)
            return _fn(*args)
        setattr(mod, f'forward_{path}', wrapped)
    return taken


@pytest.mark.parametrize('kind', CHAINS)
def test_forward_dispatch_rule(kind):
    """Reference in training and for norms without running statistics, folded in eval (autograd on, or no
    fused kernel); the native cases are in test_native_kernels.py."""
    mod, x, r = layer_attn_chain(kind)[0]
    taken = record_paths(mod)
    mod(x.clone(), r, [])
    with torch.no_grad(), native.disabled():
        mod(x.clone(), r, [])
        mod.norm.train()  # a norm in batch-statistics mode cannot be folded
        mod(x.clone(), r, [])
        mod.train()
        mod(x.clone(), r, [])
    mod(x.clone(), r, [])
    assert taken == ['folded', 'folded', 'reference', 'reference', 'reference']
    no_stats = functools.partial(torch.nn.BatchNorm2d, track_running_stats=False)
    stateless = type(mod)(mod.channels, head_dim=mod.head_dim, norm_layer=no_stats).eval()
    taken = record_paths(stateless)
    with torch.no_grad():
        stateless(x.clone(), r, [])
    assert taken == ['reference']
