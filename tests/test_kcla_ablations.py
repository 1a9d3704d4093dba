"""KCLA's Table V ablations as model kwargs (docs/design/layer_attention.md#la-kcla-ablations): every variant
against an independent reference network on every dispatch path (plain, folded, fused kernel, memory-lean
training), the defaults unchanged, the parameter counts at ResNet-56, and the refusals."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, lean, native
from timm_layerattn.layers.kcla import KCLAVariant
from timm_layerattn.models.resnet_la import checkpoint_filter_fn

from _layer_attn import assert_close_scaled, randomize_norms, run_path
from _reference import KCLAHistory, bn, depthwise3x3, eca, heads, trunk_bottleneck

# One kwarg per Table V row (head dim, row (e), is the existing `head_dim` kwarg).
ABLATIONS = {
    'same_tau': dict(temperatures='equal'),
    'no_exp': dict(key_exp=False),
    'no_head_attn': dict(head_attn=False),
    'rla_form': dict(form='rla'),
    'no_cross_stage': dict(cross_stage=False),
}
ALL_OFF = dict(temperatures='equal', key_exp=False, head_attn=False, form='rla', cross_stage=False)
CASES = {**ABLATIONS, 'all': ALL_OFF}


# ---------------------------------------------------------------------------------------------------------------
# Reference: the ablated KCLA with the history as an explicit token list (the official U / Z form)
# ---------------------------------------------------------------------------------------------------------------

def ref_norm_d(g: int, equal: bool) -> torch.Tensor:
    """The key-norm divisors `1 / s` in float32 (as the official buffer): `s` log-uniform in [0.7, 1/0.7] per
    head, or all 1."""
    if equal:
        return torch.ones(g)
    lo, hi = torch.log(torch.tensor(0.7)), torch.log(torch.tensor(1 / 0.7))  # float32, as the official code
    return torch.exp(torch.linspace(lo.item(), hi.item(), g)).reciprocal()


def ref_cell(cell, x, history, training, opts, restart):
    """One block's branch: `x + relu(BN(gate * value))` with the Table V options `opts` (model kwargs)."""
    B, C, H, W = x.shape
    g = cell.num_heads
    norm_d = ref_norm_d(g, opts.get('temperatures') == 'equal').to(x.dtype).view(1, g)

    def key_weight(norm):
        return norm / norm_d if opts.get('key_exp') is False else torch.exp(torch.clamp(norm / norm_d, max=10))

    if restart:
        history = None
    if history is not None and cell.hist_norm is not None:
        prev_g = history.tokens[-1][1].shape[1] // (C // g)
        a = history.normalised(None, prev_g)
        if cell.hist_proj is not None:
            a = F.conv2d(a, cell.hist_proj.weight, stride=cell.hist_proj.stride, groups=cell.hist_proj.groups)
        a = bn(a, cell.hist_norm, training)
        history = KCLAHistory()
        history.tokens.append((key_weight(heads(eca(a.mean((2, 3)), cell.hist_k.weight), g).norm(dim=-1)), a))
    p = x.mean((2, 3))
    k = heads(eca(p, cell.k.weight), g)
    history = history if history is not None else KCLAHistory()
    rla = opts.get('form') == 'rla'
    history.tokens.append((key_weight(k.norm(dim=-1)), depthwise3x3(x, cell.v.weight) if rla else x))
    value = history.normalised(1e-3, g)
    if not rla:
        value = depthwise3x3(value, cell.v.weight)
    if opts.get('head_attn') is not False:
        q = heads(eca(p, cell.q.weight), g)
        gate = torch.sigmoid(((q * k).sum(-1) / k.norm(dim=-1)) @ cell.head_gate.weight.t())
        value = (gate.view(B, g, 1, 1, 1) * value.view(B, g, C // g, H, W)).view(B, C, H, W)
    return x + torch.relu(bn(value, cell.norm, training)), history


def ref_features(model, x, training, opts):
    """Stem (CIFAR 3x3), bottleneck stages, the ablated cells; a new history per stage without `cross_stage`."""
    y = torch.relu(bn(F.conv2d(x, model.conv1.weight, padding=1), model.bn1, training))
    history = None
    for stage_idx, stage in enumerate(model.stages()):
        for block_idx, block in enumerate(stage):
            y, _ = trunk_bottleneck(block, y, training)
            restart = opts.get('cross_stage') is False and block_idx == 0 and stage_idx > 0
            y, history = ref_cell(block.attn, y, history, training, opts, restart)
    return y


def ablated(opts, name='cifar_resnet20_kcla', **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0., **opts, **kwargs)
    for m in model.modules():
        if isinstance(m, KCLA):
            torch.nn.init.normal_(m.v.weight, std=0.3)  # a branch that matters next to the trunk
    return randomize_norms(model)


# ---------------------------------------------------------------------------------------------------------------
# The maths, on every path
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('case', list(CASES))
def test_ablation_matches_reference_eval_every_path(case):
    """Eval logits of the plain, folded and (where the kernels build) fused paths against the reference."""
    opts = CASES[case]
    model = ablated(opts).double().eval()
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    ref = ref_features(model, x, False, opts)
    with torch.no_grad():
        assert_close_scaled(model.forward_features(x), ref, tol=1e-10)  # folded, in place
    assert_close_scaled(model.forward_features(x), ref, tol=1e-10)  # folded, autograd
    model.float()
    with torch.inference_mode():
        fast = model.forward_features(x.float())  # the fused kernel, where it computes this variant
        with native.disabled():
            plain = model.forward_features(x.float())
    assert_close_scaled(fast, ref.float(), tol=1e-4)
    assert_close_scaled(plain, ref.float(), tol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('case', list(CASES))
def test_ablation_matches_reference_train_lean_and_plain(case, dtype):
    """Training mode (batch statistics): the memory-lean path (forced; in float32 the fused training kernels
    where they build) and the module path give the reference's features and the same gradients. Batch
    statistics over the last stage's 3x4 maps amplify float32 rounding ~1e3-fold in these random nets, hence
    float64 for the tight check."""
    opts = CASES[case]
    tol = 1e-10 if dtype == torch.float64 else 5e-3
    model = ablated(opts).train().to(dtype)
    x = torch.randn(2, 3, 12, 16, dtype=dtype)
    ref = ref_features(model, x, True, opts)
    grads = []
    for ctx in (lean.forced, lean.disabled):
        model.zero_grad()
        with ctx():
            out = model.forward_features(x)
        assert_close_scaled(out, ref, tol=tol / 10)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_close_scaled(grads[0][n], grads[1][n], tol=tol)


def cells(model):
    return [m for m in model.modules() if isinstance(m, KCLA)]


@pytest.mark.parametrize('case', list(CASES))
def test_fast_paths_refuse_what_they_do_not_compute(case):
    """The fused eval op runs only for variants whose maths it computes (the default key weight, head gate and
    value order; any temperatures and restarts); elsewhere `forward_native` is `forward_folded`. The lean tail
    is offered only where `KCLABranch` computes the value order. Checked on the cells directly, so it holds
    whether or not the kernels build here."""
    opts = CASES[case]
    model = ablated(opts).eval()
    kernel_maths = opts.get('key_exp', True) and opts.get('head_attn', True) and opts.get('form', 'kcla') == 'kcla'
    torch.manual_seed(1)
    x = torch.randn(2, 64, 6, 5).relu()
    for cell in cells(model)[:2]:  # the network's first cell, then one with a history
        state = [] if cell is cells(model)[0] else [torch.randn(2, 64, 6, 5), torch.rand(2, cell.num_heads) + 1]
        ref = run_path(cell, 'reference', x, x, state)
        if not kernel_maths or native.available():
            out = run_path(cell, 'native', x, x, state)
            torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[1][0], ref[1][0], rtol=1e-5, atol=1e-5)
        with lean.forced(), torch.enable_grad():
            usable = cell.tail_usable(x.requires_grad_(), x, state)
        assert usable == (opts.get('form', 'kcla') == 'kcla')


def test_all_ablations_script():
    """TorchScript (as the default KCLA nets, tests/test_timm_contract.py): the cells without a query conv or head
    gate, the RLA form and the restarts compile and give the eager logits."""
    model = ablated(ALL_OFF).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_defaults_are_kcla():
    """The defaults passed explicitly build the same model and the same logits as no kwargs."""
    defaults = dict(temperatures='log_uniform', key_exp=True, head_attn=True, form='kcla', cross_stage=True)
    torch.manual_seed(0)
    plain = timm.create_model('cifar_resnet20_kcla', num_classes=5).eval()
    torch.manual_seed(0)
    explicit = timm.create_model('cifar_resnet20_kcla', num_classes=5, **defaults).eval()
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), explicit(x))


@pytest.mark.parametrize('case', list(ABLATIONS))
def test_each_ablation_changes_the_function(case):
    """Same weights, default vs ablated model: different logits (a kwarg that did nothing would pass the
    reference test only if the reference ignored it too)."""
    base = ablated({}).eval()
    other = ablated(ABLATIONS[case]).eval()
    # the shared weights; norm_d (the fixed temperatures) is the model's own
    other.load_state_dict({k: v for k, v in base.state_dict().items() if not k.endswith('norm_d')}, strict=False)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        diff = (base(x) - other(x)).abs().max().item()
    assert diff > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Structure and parameter counts (ResNet-56, CIFAR-100, as in Table V)
# ---------------------------------------------------------------------------------------------------------------

# cifar_resnet56_kcla, num_classes=100 (docs/design/layer_attention.md#la-kcla-ablations)
PARAMS_R56_C100 = {
    'base': 650042,
    'same_tau': 650042,
    'no_exp': 650042,
    'no_head_attn': 647948,   # no W_head (g^2) nor query conv (k taps) in any of the 18 cells
    'rla_form': 650042,
    'no_cross_stage': 646192,  # no hist_proj / hist_k / hist_norm at the entries of stages 2 and 3
    'h2': 774362, 'h4': 677978, 'h8': 654554, 'h32': 651602,
}


def test_param_counts_resnet56_table5():
    cases = {**ABLATIONS, 'base': {}, **{f'h{d}': dict(head_dim=d) for d in (2, 4, 8, 32)}}
    for case, kwargs in cases.items():
        model = timm.create_model('cifar_resnet56_kcla', num_classes=100, device='meta', **kwargs)
        assert sum(p.numel() for p in model.parameters()) == PARAMS_R56_C100[case], case
    # What the counts are made of: W_head g x g plus a k-tap query conv per cell; the re-summary modules.
    base = timm.create_model('cifar_resnet56_kcla', num_classes=100, device='meta')
    gate = sum(c.head_gate.weight.numel() + c.q.weight.numel() for c in cells(base))
    assert PARAMS_R56_C100['base'] - PARAMS_R56_C100['no_head_attn'] == gate == 6 * (16 + 64 + 256 + 3 + 5 + 5)
    entries = [c for c in cells(base) if c.hist_proj is not None]
    assert len(entries) == 2 and all(c.hist_norm is not None for c in cells(base)[:: 6][1:])
    extra = sum(p.numel() for c in entries for m in (c.hist_proj, c.hist_k, c.hist_norm) for p in m.parameters())
    assert PARAMS_R56_C100['base'] - PARAMS_R56_C100['no_cross_stage'] == extra
    # The paper: "when h = 2, it will introduce an additional 0.1M parameters".
    assert 0.1e6 < PARAMS_R56_C100['h2'] - PARAMS_R56_C100['base'] < 0.15e6


def test_structure_of_each_ablation():
    model = timm.create_model('cifar_resnet20_kcla', head_attn=False, device='meta')
    assert all(c.q is None and c.head_gate is None for c in cells(model))
    assert not any('head_gate' in k or '.attn.q.' in k for k in model.state_dict())
    model = timm.create_model('cifar_resnet20_kcla', cross_stage=False, device='meta')
    restarts = [c.restart for c in cells(model)]
    assert restarts == [False, False, True, False, True, False]
    assert all(c.hist_norm is None for c in cells(model))
    model = timm.create_model('cifar_resnet20_kcla', temperatures='equal')
    assert all(torch.equal(c.norm_d, torch.ones(c.num_heads)) for c in cells(model))


def test_imagenet_and_basic_nets_take_the_kwargs():
    """The ImageNet KCLA nets take every kwarg; with `cross_stage=False` ResNet-101's mid-stage re-summary
    (layer3 block 11) stays, only the stage entries restart."""
    m = timm.create_model('resnet101_kcla', cross_stage=False, head_attn=False, device='meta')
    entries = [m.layer2[0].attn, m.layer3[0].attn, m.layer4[0].attn]
    assert all(c.restart and c.hist_norm is None for c in entries)
    assert m.layer3[11].attn.hist_norm is not None and not m.layer3[11].attn.restart
    assert sum(p.numel() for p in m.parameters()) == 45010772 - 64529 - 37227  # base, stage entries, head attention
    model = timm.create_model('resnet18_kcla', num_classes=3, **ALL_OFF).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_ablated_checkpoint_round_trip():
    """An ablated model's own checkpoint (norm_d all ones, no head gates) loads back strictly through the
    checkpoint filter."""
    model = ablated(dict(temperatures='equal', head_attn=False))
    sd = model.state_dict()
    fresh = timm.create_model('cifar_resnet20_kcla', num_classes=5, temperatures='equal', head_attn=False)
    fresh.load_state_dict(checkpoint_filter_fn(sd, fresh), strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())
    # The fixed temperatures are part of the architecture: a default KCLA model refuses this checkpoint.
    default = timm.create_model('cifar_resnet20_kcla', num_classes=5, head_attn=False)
    with pytest.raises(RuntimeError, match=r"layer1\.0\.attn\.norm_d: the checkpoint's KCLA temperatures are not "
                                           r"this model's \(temperatures='log_uniform'\); build it with "
                                           r"temperatures='equal'"):
        default.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------------------------
# DeiT and the refusals
# ---------------------------------------------------------------------------------------------------------------

def test_deit_kcla_takes_the_cell_ablations():
    m = timm.create_model('deit_tiny_patch16_224_kcla', head_attn=False, form='rla', temperatures='equal',
                          key_exp=False, device='meta')
    c = cells(m)
    assert len(c) == 12 and all(x.q is None and x.value_first and not x.key_exp for x in c)
    assert timm.create_model('deit_tiny_patch16_224_kcla', cross_stage=True, device='meta') is not None
    with pytest.raises(ValueError, match=r'^deit_tiny_patch16_224_kcla: cross_stage must be True \(a ViT has one'):
        timm.create_model('deit_tiny_patch16_224_kcla', cross_stage=False, device='meta')


@pytest.mark.parametrize('kwargs, exc, msg', [
    (dict(temperatures='same'), ValueError, r"temperatures must be one of \('log_uniform', 'equal'\), got 'same'"),
    (dict(form='RLA'), ValueError, r"form must be one of \('kcla', 'rla'\), got 'RLA'"),
    (dict(key_exp=0), TypeError, r'key_exp must be True or False, got 0'),
    (dict(head_attn='no'), TypeError, r"head_attn must be True or False, got 'no'"),
])
def test_bad_values_fail_in_one_line(kwargs, exc, msg):
    with pytest.raises(exc, match=msg) as err:
        timm.create_model('cifar_resnet20_kcla', device='meta', **kwargs)
    assert '\n' not in str(err.value)
    assert str(err.value).startswith('cifar_resnet20_kcla: ')


def test_other_families_refuse_the_kwargs():
    for name in ('cifar_resnet20_mrlal', 'resnet50_mrlab', 'cifar_resnet20'):
        with pytest.raises(TypeError, match='key_exp'):
            timm.create_model(name, key_exp=False, device='meta')
    with pytest.raises(ValueError, match=r'^LayerAttnCfg: kcla must be the default'):
        from timm_layerattn.layers import LayerAttnCfg
        LayerAttnCfg('mrla_light', 16, kcla=KCLAVariant(head_attn=False))
    with pytest.raises(ValueError, match=r'^KCLA: a cell cannot both restart and rebuild'):
        KCLA(64, head_dim=16, in_channels=32, rebuild=True, restart=True)


def test_cross_stage_off_frees_head_dim_from_the_projection_rule():
    """Without the cross-stage projection only the blocks must split into heads: head dim 1 (the 64 -> 128
    projection would need 128 groups of a 64-channel history) is refused by default, accepted without it."""
    with pytest.raises(ValueError, match='head_dim'):
        timm.create_model('cifar_resnet20_kcla', head_dim=1, device='meta')
    model = timm.create_model('cifar_resnet20_kcla', head_dim=1, cross_stage=False, device='meta')
    assert cells(model)[-1].num_heads == 256
