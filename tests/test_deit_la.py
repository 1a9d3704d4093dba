"""DeiT with layer attention (`timm_layerattn/models/deit_la.py`, `layers/vit_la.py`, `checkpoints/deit_mrla.py`).

* Parameter counts against the official DeiT-MRLA code (measured, see docs/design/vit_layer_attention.md) and
  KCLA's closed form.
* Parity: official-layout state dicts generated here (`_reference_vit.official_state_dict`) are converted with
  `convert_official` / the CLI / timm's `pretrained=True` filter and the models built with default arguments
  reproduce `_reference_vit.official_forward` (an independent re-implementation of the official forward) within
  1e-4 relative.
* The generalisations: non-square grids, other prefix tokens, the official setting unchanged by them.
* The carried state: grad checkpointing, `forward_intermediates`, MRLA-base's cache resets.
* `load_trunk` from timm's plain `deit_*` weights, argument errors.

The timm contract as such (script, fx, compile, export, features, pruning, ...) comes from the registry-driven
tests (`tests/test_timm_contract.py`, `tests/test_timm_models.py`, `tests/test_bad_inputs_models.py`).
"""
import copy

import pytest
import safetensors.torch
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official, load_trunk
from timm_layerattn._utils.errors import UserError
from timm_layerattn.cli import main as cli_main
from timm_layerattn.checkpoints.rules import official_layout
from timm_layerattn.layers._common import eca_kernel_size
from timm_layerattn.layers.factory import LayerAttnCfg, create_layer_attn
from timm_layerattn.layers import lean
from timm_layerattn.layers.vit_la import GridCell, MRLABaseTokens, MRLALightTokens, TokenCacheSum, TokenConv

from _reference_vit import mrla_base, mrla_light, official_forward, official_state_dict

SIZES = dict(tiny=192, small=384, base=768)
# Official parameter counts (measured with joyfang1106/MRLA's deit/deit_mrla_{light,base}.py and timm's deit_*).
OFFICIAL = {
    ('tiny', 'mrlal'): 5_749_792, ('small', 'mrlal'): 22_115_296, ('base', 'mrlal'): 86_696_800,
    ('tiny', 'mrlab'): 5_742_880, ('small', 'mrlab'): 22_101_472, ('base', 'mrlab'): 86_669_152,
}
PLAIN = dict(tiny=5_717_416, small=22_050_664, base=86_567_656)


def _count(name: str, **kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(name, device='meta', **kwargs).parameters())


@pytest.mark.parametrize('size,kind', list(OFFICIAL))
def test_param_counts_equal_official(size, kind):
    assert _count(f'deit_{size}_patch16_224_{kind}') == OFFICIAL[size, kind]
    c, k = SIZES[size], eca_kernel_size(SIZES[size])
    per_block = dict(mrlal=14 * c + 2 * k, mrlab=11 * c + 2 * k)[kind]  # 2 LN (MRLA-L) or 1, lambda, DW3, 2 ECA
    assert OFFICIAL[size, kind] == PLAIN[size] + 12 * per_block


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_plain_trunk_is_timms_deit(size):
    assert _count(f'deit_{size}_patch16_224') == PLAIN[size]


@pytest.mark.parametrize('size', ['tiny', 'small'])
def test_kcla_param_count_closed_form(size):
    """KCLA cell on the grid: DW3 9C, BatchNorm 2C, head gate g^2, two ECA convs (no re-summary modules: one
    history through all blocks, docs/design/vit_layer_attention.md#vit-kcla)."""
    c, k = SIZES[size], eca_kernel_size(SIZES[size])
    g = c // 16
    assert _count(f'deit_{size}_patch16_224_kcla') == PLAIN[size] + 12 * (11 * c + g * g + 2 * k)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official forward (models built with default arguments)
# ---------------------------------------------------------------------------------------------------------------

def _assert_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= rtol, err


@pytest.mark.parametrize('kind,official', [('mrlal', 'light'), ('mrlab', 'base')])
def test_official_parity_via_convert(kind, official):
    sd = official_state_dict('tiny', official)
    assert official_layout(sd) == f'deit_mrla_{official}'
    converted = convert_official(sd, f'deit_tiny_patch16_224_{kind}')
    model = timm.create_model(f'deit_tiny_patch16_224_{kind}').eval()
    model.load_state_dict(converted)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = official_forward(sd, x, 'tiny', official)
        _assert_rel(model(x), ref)
        # The generalisation (dynamic image size) does not change the official setting's outputs.
        fixed = timm.create_model(f'deit_tiny_patch16_224_{kind}', dynamic_img_size=False).eval()
        fixed.load_state_dict(converted)
        torch.testing.assert_close(fixed(x), model(x), rtol=0, atol=0)


def test_official_parity_via_timm_pretrained_and_cli(tmp_path, capsys):
    """The training-script container (`model` nesting) through `timm-layerattn convert`, and the raw official file
    through timm's `pretrained=True` (the family's `checkpoint_filter_fn`): the same tensors either way."""
    sd = official_state_dict('tiny', 'base', seed=3)
    src = tmp_path / 'checkpoint.pth'
    torch.save({'model': sd, 'epoch': 299}, src)
    out = tmp_path / 'converted.safetensors'
    assert cli_main(['convert', '--model', 'deit_tiny_patch16_224_mrlab', str(src), str(out)]) == 0
    assert 'deit_mrla_base checkpoint' in capsys.readouterr().out
    via_cli = timm.create_model('deit_tiny_patch16_224_mrlab', pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out))).eval()
    via_filter = timm.create_model('deit_tiny_patch16_224_mrlab', pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(src))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = official_forward(sd, x, 'tiny', 'base')
        _assert_rel(via_cli(x), ref)
        torch.testing.assert_close(via_filter(x), via_cli(x), rtol=0, atol=0)


def test_conversion_is_strict():
    sd = official_state_dict('tiny', 'light')
    with pytest.raises(UserError, match="official deit_mrla_light checkpoint, but 'deit_tiny_patch16_224_mrlab'"):
        convert_official(sd, 'deit_tiny_patch16_224_mrlab')
    with pytest.raises(UserError, match='official deit_mrla_light'):
        convert_official(sd, 'resnet50_mrlal')  # the ResNet rules do not claim the DeiT layout
    missing = {k: v for k, v in sd.items() if k != 'blocks.3.mrla.lambda_t'}
    with pytest.raises(UserError, match='blocks.3.layer_attn.lambda_t'):
        convert_official(missing, 'deit_tiny_patch16_224_mrlal')
    with pytest.raises(UserError, match='distilled'):
        convert_official({**sd, 'dist_token': torch.zeros(1, 1, 192)}, 'deit_tiny_patch16_224_mrlal')
    with pytest.raises(UserError, match='pos_embed'):  # trained at 384 px
        convert_official(official_state_dict('tiny', 'light', img=384), 'deit_tiny_patch16_224_mrlal')


# ---------------------------------------------------------------------------------------------------------------
# The modules on any grid and prefix (the generalisations), against the reference with the grid given
# ---------------------------------------------------------------------------------------------------------------

def _official_params(module, prefix: str) -> dict:
    """A module's tensors under the official names (what the reference reads)."""
    names = {'norm.': 'normx.', 'norm_prev.': 'normo.', 'q.': 'mrla.Wq.', 'k.': 'mrla.Wk.', 'v.': 'mrla.Wv.'}
    out = {}
    for k, v in module.state_dict().items():
        for ours, theirs in names.items():
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        out[prefix + k] = v
    return out


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding of sums over the grid and channels (scaled to the largest value)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _randomise_and_return(module):
    _randomise(module)
    return module


def _randomise(module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0., 0.5).add_(1. if p.ndim == 1 and p.shape[0] != 0 else 0.)


def _path(fused: bool, request):
    """Autograd on, lean path off: the PyTorch ops; autograd off: the fused token kernel (skipped without a C++
    compiler)."""
    if fused:
        request.getfixturevalue('ops')
        return torch.no_grad()
    return lean.disabled()


def _kernel_ran(fn) -> bool:
    """Whether `fn()` ran a token-grid kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.key.startswith('timm_layerattn::') and e.key.endswith('_tokens') for e in prof.key_averages())


@pytest.mark.parametrize('fused', [False, True], ids=['torch', 'kernel'])
@pytest.mark.parametrize('prefix,hw', [(1, (14, 14)), (1, (3, 5)), (0, (4, 2)), (5, (2, 7)), (2, (1, 1))])
def test_mrla_light_tokens_any_grid_and_prefix(prefix, hw, fused, request):
    m = MRLALightTokens(32, head_dim=16, num_prefix_tokens=prefix).eval()
    _randomise(m)
    x, o = torch.randn(2, prefix + hw[0] * hw[1], 32), torch.randn(2, prefix + hw[0] * hw[1], 32)
    with _path(fused, request):
        out, state = m(x, o, [], *hw)
        assert _kernel_ran(lambda: m(x, o, [], *hw)) == fused
    assert state == []
    ref = x + mrla_light(x, o, _official_params(m, 'm.'), 'm.', prefix=prefix, hw=hw)
    _close(out, ref)


@pytest.mark.parametrize('fused', [False, True], ids=['torch', 'kernel'])
@pytest.mark.parametrize('prefix,hw', [(1, (14, 14)), (1, (6, 3)), (0, (2, 5)), (5, (3, 4))])
def test_mrla_base_tokens_carry_and_reset(prefix, hw, fused, request):
    """Three blocks: the cache grows, then a reset block starts a new one (the official `layer_index % 4`)."""
    mods = [MRLABaseTokens(48, head_dim=16, reset=r, num_prefix_tokens=prefix).eval() for r in (True, False, True)]
    x = torch.randn(2, prefix + hw[0] * hw[1], 48)
    state, ref, prev_k, prev_v = [], x, None, None
    for i, m in enumerate(mods):
        _randomise(m)
        with _path(fused, request):
            assert _kernel_ran(lambda: m(x, x, state, *hw)) == fused
            x, state = m(x, x, state, *hw)
        branch, prev_k, prev_v = mrla_base(ref, _official_params(m, 'm.'), 'm.', prev_k, prev_v, m.reset,
                                           prefix=prefix, hw=hw)
        ref = ref + branch
        assert len(state) == 1 + prev_k.shape[1] and state[0].shape == prev_k.shape
        _close(x, ref)


def test_mrla_base_tokens_cache_crosses_paths(ops):
    """Each path reads the cache the other wrote (values are `[B, C, H, W]` views of channels-last buffers on both);
    the kernel steps aside for a cache in another layout instead of misreading it, and runs again after a reset."""
    mods = [_randomise_and_return(MRLABaseTokens(32, head_dim=16, reset=r).eval())
            for r in (True, False, False, False, True)]
    x = torch.randn(2, 1 + 12, 32)
    ref_state, state = [], []
    ref = out = x
    for i, m in enumerate(mods):
        with lean.disabled():
            ref, ref_state = m(ref, ref, ref_state, 3, 4)  # autograd on, lean path off: PyTorch ops throughout
        if i == 3:
            state = state[:1] + [v.contiguous() for v in state[1:]]  # NCHW: not the kernel's layout
        with lean.disabled() if i == 1 else torch.no_grad():
            assert _kernel_ran(lambda: m(out, out, state, 3, 4)) == (i != 1 and i != 3)
            out, state = m(out, out, state, 3, 4)
        _close(out, ref)


def test_token_kernels_reject_bad_input(ops):
    m = MRLALightTokens(32, head_dim=16).eval()
    x = torch.randn(2, 1 + 12, 32)
    args = dict(shortcut=x, norm_weight=m.norm.weight, norm_bias=m.norm.bias, norm_eps=1e-5,
                prev_weight=m.norm_prev.weight, prev_bias=m.norm_prev.bias, prev_eps=1e-5, v_weight=m.v.weight,
                q_weight=m.q.weight, k_weight=m.k.weight, lambda_t=m.lambda_t, num_prefix=1, grid_h=3, grid_w=4,
                head_dim=16, attn_scale=0.25, prefix_norm=True)
    from timm_layerattn.layers import native
    with torch.no_grad():
        with pytest.raises(RuntimeError, match='expected 1 prefix tokens \\+ a 4 x 4 grid'):
            native.mrla_light_tokens(x, **{**args, 'grid_h': 4})
        with pytest.raises(RuntimeError, match='3-D'):
            native.mrla_light_tokens(x[0], **args)
        with pytest.raises(RuntimeError, match='head_dim'):
            native.mrla_light_tokens(x, **{**args, 'head_dim': 5})
        with pytest.raises(RuntimeError, match='keys must be given'):
            native.mrla_base_tokens(x, values=[torch.randn(2, 3, 4, 32)], keys=None, norm_weight=m.norm.weight,
                                    norm_bias=m.norm.bias, norm_eps=1e-5, v_weight=m.v.weight, q_weight=m.q.weight,
                                    k_weight=m.k.weight, num_prefix=1, grid_h=3, grid_w=4, head_dim=16,
                                    attn_scale=0.25, prefix_norm=True)


@pytest.mark.parametrize('gelu', [True, False])
@pytest.mark.parametrize('prefix,hw', [(1, (14, 14)), (0, (3, 5)), (2, (1, 1)), (5, (2, 7))])
def test_token_conv_training_kernels_match_float64(ops, gelu, prefix, hw):
    """`TokenConv` (the depth-wise conv, then GELU, of the patch grid in token layout, for training): output and
    both gradients equal the float64 conv of the grid view, to float32 rounding."""
    y = torch.randn(3, prefix + hw[0] * hw[1], 32, requires_grad=True)
    w = torch.randn(32, 1, 3, 3, requires_grad=True)
    out = TokenConv.apply(y, w, prefix, *hw, gelu)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, w), g)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, = TokenConv.reference(y64, w64, prefix, *hw, gelu)
    want = torch.autograd.grad(ref, (y64, w64), g.double())
    _close(out.double(), ref.detach())
    for a, b in zip(got, want):
        _close(a.double(), b)
    assert not got[0][:, :prefix].any()  # prefix tokens do not enter the conv


@pytest.mark.parametrize('t', [1, 2, 4])
def test_token_cache_sum_training_kernels_match_float64(ops, t):
    """`TokenCacheSum` (MRLA-base's weighted sum over the cached values, for training): output and the gradients
    of the weights and of every value equal the float64 sum, to float32 rounding."""
    weights = torch.rand(3, t, 32, requires_grad=True)
    values = [torch.randn(3, 5, 4, 32).permute(0, 3, 1, 2).requires_grad_() for _ in range(t)]  # channels-last views
    out = TokenCacheSum.apply(weights, *values)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [weights, *values], g)
    inputs = [weights.detach().double().requires_grad_()] + [v.detach().double().requires_grad_() for v in values]
    ref, = TokenCacheSum.reference(*inputs)
    want = torch.autograd.grad(ref, inputs, g.double())
    _close(out.double(), ref.detach())
    for a, b in zip(got, want):
        _close(a.double(), b)


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224_mrlal', 'deit_tiny_patch16_224_mrlab'])
def test_training_takes_the_token_conv_and_matches_float64(ops, name):
    """A training step on a non-square input runs `TokenConv` (and MRLA-base's `TokenCacheSum`) in every block and
    is as close to the float64 step as the PyTorch-ops step is; a gradient penalty (`create_graph=True`) replays
    their maths to the same gradients."""
    model = timm.create_model(name, img_size=64).train()
    x = torch.randn(2, 3, 64, 48)

    def step(m, inp, penalty=False):
        m.zero_grad(set_to_none=True)
        inp = inp.clone().requires_grad_()
        out = m(inp)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        if penalty:
            loss = torch.autograd.grad(loss, inp, create_graph=True)[0].square().sum()
        loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                          for p in m.parameters()])  # a penalty leaves the head's bias without gradient

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused = step(model, x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get('timm_layerattn::token_dwconv') == calls.get('timm_layerattn::token_dwconv_backward') == 12
    cache_sums = 12 if name.endswith('mrlab') else None
    assert calls.get('timm_layerattn::token_cache_sum') == calls.get('timm_layerattn::token_cache_sum_backward') \
        == cache_sums
    with lean.disabled():
        plain = step(copy.deepcopy(model), x)
        truth = step(copy.deepcopy(model).double(), x.double())
    assert rel(fused, truth) <= max(2e-5, 3 * rel(plain, truth))
    for block in model.blocks:  # timm's fused attention has no second derivative; the eager maths has
        block.attn.fused_attn = False
    with lean.disabled():
        want = step(copy.deepcopy(model), x, penalty=True)
    assert rel(step(model, x, penalty=True), want) <= 1e-4


def test_token_training_kernels_reject_bad_input(ops):
    from timm_layerattn.layers import native
    y, w = torch.randn(2, 1 + 12, 32), torch.randn(32, 1, 3, 3)
    with pytest.raises(RuntimeError, match='expected 1 prefix tokens \\+ a 4 x 4 grid'):
        native.token_dwconv(y, w, num_prefix=1, grid_h=4, grid_w=4, gelu=True)
    with pytest.raises(RuntimeError, match='v_weight'):
        native.token_dwconv(y, w[:16], num_prefix=1, grid_h=3, grid_w=4, gelu=True)
    with pytest.raises(RuntimeError, match='grad'):
        native.token_dwconv_backward(torch.randn(2, 13, 32), y, w, num_prefix=1, grid_h=3, grid_w=4, gelu=False)
    values = [torch.randn(2, 3, 4, 32)]
    with pytest.raises(RuntimeError, match='weights'):
        native.token_cache_sum(torch.randn(2, 2, 32), values)
    with pytest.raises(RuntimeError, match='values must not be empty'):
        native.token_cache_sum(torch.randn(2, 0, 32), [])


def test_prefix_norm_off_leaves_prefix_tokens_alone():
    for m in (MRLALightTokens(32, num_prefix_tokens=3, prefix_norm=False),
              MRLABaseTokens(32, num_prefix_tokens=3, prefix_norm=False)):
        x = torch.randn(2, 3 + 12, 32)
        out, _ = m(x, x, [], 3, 4)
        assert torch.equal(out[:, :3], x[:, :3])
        on = type(m)(32, num_prefix_tokens=3)
        on.load_state_dict(m.state_dict())
        out_on, _ = on(x, x, [], 3, 4)
        torch.testing.assert_close(out_on[:, 3:], out[:, 3:])
        torch.testing.assert_close(out_on[:, :3], x[:, :3] + on.norm(x)[:, :3])  # the official quirk


def test_grid_cell_is_the_resnet_kcla_cell_on_the_grid():
    cell = create_layer_attn(LayerAttnCfg('kcla', 16), 32, None, 0, 1, 0.).eval()
    m = GridCell(cell, num_prefix_tokens=2).eval()
    x = torch.randn(2, 2 + 3 * 5, 32)
    out, state = m(x, x, [], 3, 5)
    grid = x[:, 2:].reshape(2, 3, 5, 32).permute(0, 3, 1, 2)
    ref, ref_state = cell.forward_reference(grid.contiguous(), grid, [])
    assert torch.equal(out[:, :2], x[:, :2])
    torch.testing.assert_close(out[:, 2:], ref.flatten(2).transpose(1, 2))
    torch.testing.assert_close(state[0], ref_state[0])


# ---------------------------------------------------------------------------------------------------------------
# Models: sizes, prefix tokens, pooling, carried state
# ---------------------------------------------------------------------------------------------------------------

NAMES = ['deit_tiny_patch16_224_mrlal', 'deit_tiny_patch16_224_mrlab', 'deit_tiny_patch16_224_kcla']


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('kwargs', [dict(), dict(class_token=False, global_pool='avg'), dict(reg_tokens=4),
                                    dict(global_pool='avg'), dict(reg_tokens=2, no_embed_class=True)])
def test_non_square_inputs_and_prefix_variants(name, kwargs):
    model = timm.create_model(name, num_classes=5, **kwargs)
    x = torch.randn(2, 3, 48, 80)  # a 3 x 5 grid
    out = model.train()(x)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        taps = model.forward_intermediates(x, indices=[0, 11], intermediates_only=True)
        assert [t.shape for t in taps] == [(2, 192, 3, 5)] * 2
        assert torch.isfinite(model(x)).all() and model(x[:0]).shape == (0, 5)


@pytest.mark.parametrize('name', NAMES)
def test_grad_checkpointing_threads_the_state(name):
    """Equal gradients with checkpointed blocks (the carried MRLA-base cache / KCLA history are passed to each
    checkpointed block as tensor arguments); also through `forward_intermediates`."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).train()
    x = torch.randn(2, 3, 32, 48)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn().square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(lambda: model(x))
    inter = grads(lambda: model.forward_intermediates(x, intermediates_only=True)[-1])
    model.set_grad_checkpointing(True)
    for got, want in ((grads(lambda: model(x)), ref),
                      (grads(lambda: model.forward_intermediates(x, intermediates_only=True)[-1]), inter)):
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
        assert got.keys() == want.keys()
    assert len(ref) == len(list(model.parameters())) and len(inter) == len(ref) - 4  # all but norm and head


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_carry_the_state(name):
    """Each tap is the block output of the full forward (checked by hooks), stop_early included."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 48)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0])) for b in model.blocks]
    with torch.no_grad():
        feats = model.forward_features(x)
        final, taps = model.forward_intermediates(x, output_fmt='NLC')
        early = model.forward_intermediates(x, indices=[2, 5], stop_early=True, intermediates_only=True)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(final, feats)
    for tap, out in zip(taps, seen[:12]):
        torch.testing.assert_close(tap, out[:, 1:])
    torch.testing.assert_close(early[1], taps[5].reshape(1, 4, 3, -1).permute(0, 3, 1, 2))


def test_mrlab_reset_every():
    resets = lambda m: [b.layer_attn.reset for b in m.blocks]  # noqa: E731
    assert resets(timm.create_model('deit_tiny_patch16_224_mrlab', device='meta')) == [i % 4 == 0 for i in range(12)]
    assert resets(timm.create_model('deit_tiny_patch16_224_mrlab', reset_every=6, device='meta')) == \
        [i % 6 == 0 for i in range(12)]
    assert resets(timm.create_model('deit_tiny_patch16_224_mrlab', reset_every=0, device='meta')) == \
        [i == 0 for i in range(12)]


def test_autocast_and_low_precision_finite():
    """float16 / bfloat16 autocast (training and eval) and a bfloat16 model stay finite, as timm's plain DeiT does."""
    for name in NAMES + ['deit_tiny_patch16_224']:
        model = timm.create_model(name, dynamic_img_size=True).eval()
        x = torch.randn(2, 3, 32, 32) * 50
        for dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
                assert torch.isfinite(model(x).float()).all(), (name, dtype)
            with torch.autocast('cpu', dtype=dtype):
                out = model.train()(x)
            out.float().square().mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), (name, dtype)
            model.zero_grad(set_to_none=True)
            model.eval()
        with torch.no_grad():
            assert torch.isfinite(model.to(torch.bfloat16)(x.bfloat16()).float()).all(), name


def test_argument_errors():
    with pytest.raises(ValueError, match=r"deit_tiny_patch16_224_mrlal: head_dim must be one of .*got 40"):
        timm.create_model('deit_tiny_patch16_224_mrlal', head_dim=40, device='meta')
    with pytest.raises(TypeError, match='reset_every'):
        timm.create_model('deit_tiny_patch16_224_mrlal', reset_every=2, device='meta')
    with pytest.raises(TypeError, match='prefix_norm'):
        timm.create_model('deit_tiny_patch16_224_kcla', prefix_norm=False, device='meta')
    with pytest.raises(ValueError, match='reset_every must be a non-negative integer'):
        timm.create_model('deit_tiny_patch16_224_mrlab', reset_every=-1, device='meta')
    with pytest.raises(ValueError, match='patch_drop_rate must be 0'):
        timm.create_model('deit_tiny_patch16_224_mrlab', patch_drop_rate=0.1, device='meta')
    with pytest.raises(TypeError, match="does not take 'depth'"):
        timm.create_model('deit_tiny_patch16_224_kcla', depth=6, device='meta')
    for kwargs, exc, fragment in [
            (dict(num_classes=-1), ValueError, 'num_classes must be a non-negative integer, got -1'),
            (dict(drop_path_rate=1.5), ValueError, 'drop_path_rate must be a probability in [0, 1), got 1.5'),
            (dict(global_pool='mean'), ValueError, "global_pool must be one of"),
            (dict(class_token=False), ValueError, "global_pool='token' needs the class token"),
            (dict(reg_tokens=-2), ValueError, 'reg_tokens must be a non-negative integer'),
            (dict(class_token='no'), TypeError, 'class_token must be True or False')]:
        with pytest.raises(exc) as info:
            timm.create_model('deit_tiny_patch16_224_mrlab', device='meta', **kwargs)
        assert str(info.value).startswith('deit_tiny_patch16_224_mrlab: ') and fragment in str(info.value)
    model = timm.create_model('deit_tiny_patch16_224_mrlal').eval()
    with pytest.raises(AssertionError, match='at least one patch'):
        model(torch.randn(1, 3, 8, 64))
    with pytest.raises(AssertionError, match='3 input channels'):
        model(torch.randn(1, 4, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# Warm start from timm's plain DeiT
# ---------------------------------------------------------------------------------------------------------------

def test_load_trunk_from_timm_deit(tmp_path):
    plain = timm.create_model('deit_tiny_patch16_224')
    path = tmp_path / 'deit_tiny.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    model = timm.create_model('deit_tiny_patch16_224_mrlal')
    before = {k: v.clone() for k, v in model.state_dict().items() if '.layer_attn.' in k}
    result = load_trunk(model, str(path))
    state = model.state_dict()
    assert set(result.loaded) == set(plain.state_dict())  # every trunk tensor, self-attention included
    for k, v in plain.state_dict().items():
        assert torch.equal(state[k], v), k
    assert result.missing and all('.layer_attn.' in k for k in result.missing)
    for k, v in before.items():
        assert torch.equal(state[k], v), k


@pytest.mark.slow
@pytest.mark.parametrize('name', ['deit_tiny_patch16_224_mrlab', 'deit_tiny_patch16_224_kcla'])
def test_onnx_export_dynamic_sizes(tmp_path, name):
    """ONNX with dynamic batch / height / width (`timm-layerattn export --onnx` uses `export_onnx`): the carried
    state and the grid follow the input size (onnxruntime checks two shapes, one padded to whole patches)."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    from timm_layerattn.hub import export_onnx
    model = timm.create_model(name).eval()
    result = export_onnx(model, tmp_path / 'm.onnx', input_size=(3, 64, 64))
    assert len(result.checks) == 2 and result.checks[0].shape[2:] != result.checks[1].shape[2:]
    assert all(c.max_rel_err <= 1e-4 for c in result.checks)
