"""The memory-lean training path (`timm_layerattn.layers.lean`): the block tail and each family's branch as
autograd Functions, with PyTorch ops everywhere and fused CPU kernels for float32.

What must hold: the same outputs, gradients, BatchNorm statistics and drop-path draws as the plain-ops path
(float64: to rounding; float32: to float32 accuracy against a float64 truth), exact gradients
(`torch.autograd.gradcheck`), everything kept for backward in `ctx.save_for_backward` and much less of it, and
the features around training: grad checkpointing, DDP without unused parameters, `torch.compile(fullgraph=True)`,
autocast, eval-mode norms (detection), channels_last and the switches that turn the path off.
"""
import contextlib
import copy

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, MRLABase, MRLALight, lean, native
from timm_layerattn.layers.kcla import KCLABranch
from timm_layerattn.layers.lean import BlockTail, NormReLU
from timm_layerattn.models.resnet_blocks import LABlock
from timm_layerattn.layers.mrla import MRLABaseBranch, MRLALightBranch
from timm_layerattn.tools.bench import activation_bytes

from _layer_attn import assert_close_scaled, graph_nodes, randomize_norms

CIFAR = ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab']
LEAN_NODES = {'BlockTailBackward', 'KCLABranchBackward', 'MRLALightBranchBackward', 'MRLABaseBranchBackward'}


def lean_node_names(out: torch.Tensor):
    return sorted(type(n).__name__ for n in graph_nodes(out) if type(n).__name__ in LEAN_NODES)


def step(model: torch.nn.Module, x: torch.Tensor, seed: int = 1):
    """One forward + backward of a fixed loss: (output, input grad, parameter grads, state_dict), float64."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = {n.removeprefix('_orig_mod.'): p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    state = {k.removeprefix('_orig_mod.'): v.double() for k, v in model.state_dict().items()}
    return out.detach().double(), x.grad.double(), grads, state


def assert_same_step(a, b, tol: float):
    assert_close_scaled(a[0], b[0], tol)
    assert_close_scaled(a[1], b[1], tol)
    assert a[2].keys() == b[2].keys()
    scale = max(g.abs().max().item() for g in b[2].values())
    for k in b[2]:  # parameter gradients on the scale of all of them (some are ~0 in exact arithmetic)
        err = (a[2][k] - b[2][k]).abs().max().item()
        assert err <= tol * scale, f'{k}: gradient error {err:.3g} > {tol:g} x {scale:.3g}'
    assert a[3].keys() == b[3].keys()
    for k in b[3]:  # BatchNorm running statistics and num_batches_tracked included
        torch.testing.assert_close(a[3][k], b[3][k], rtol=tol, atol=tol, msg=k)


@contextlib.contextmanager
def pytorch_ops():
    """The lean Functions with PyTorch ops (no fused kernels), also on CPU where 'auto' would run plain autograd."""
    with native.disabled(), lean.forced():
        yield


def lean_and_plain(model: torch.nn.Module, x: torch.Tensor, context=lean.forced):
    """The same step through the lean path (forced: float64 and channels_last would take plain autograd on CPU by
    default) and, on a copy, the plain-ops path."""
    plain_model = copy.deepcopy(model)
    with context():
        got = step(model, x)
    with lean.disabled():
        ref = step(plain_model, x)
    return got, ref


# ---------------------------------------------------------------------------------------------------------------
# Same maths as the plain path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', CIFAR)
@pytest.mark.parametrize('mode', ['train', 'train_drop_path', 'eval'])
def test_lean_path_equals_plain_path_float64(name, mode):
    """Outputs, input and parameter gradients, running statistics, num_batches_tracked and drop-path draws
    (same seed, same RNG calls) equal the plain-ops path, and every block took the lean path."""
    drop = 0.3 if mode == 'train_drop_path' else 0.
    model = randomize_norms(timm.create_model(name, drop_path_rate=drop)).double().train(mode != 'eval')
    x = torch.randn(3, 3, 24, 20, dtype=torch.float64)
    probe = copy.deepcopy(model)
    with lean.forced():
        out = probe(x.clone().requires_grad_())
    blocks = sum(1 for m in model.modules() if isinstance(m, (KCLA, MRLALight, MRLABase)))
    names = lean_node_names(out)
    assert names.count('BlockTailBackward') == blocks and len(names) == 2 * blocks, names
    got, ref = lean_and_plain(model, x, pytorch_ops)  # float64 runs PyTorch ops either way
    assert_same_step(got, ref, tol=1e-10)


def step_error(a, b) -> float:
    """Largest error of a `step` result against `b`: output and input gradient on their own scales, parameter
    gradients on the scale of all of them."""
    err = max(((a[i] - b[i]).abs().max() / b[i].abs().max()).item() for i in (0, 1))
    scale = max(g.abs().max().item() for g in b[2].values())
    return max(err, max((a[2][k] - b[2][k]).abs().max().item() for k in b[2]) / scale)


def _no_running_stats(m: torch.nn.BatchNorm2d) -> None:
    m.track_running_stats = False
    m.running_mean = m.running_var = m.num_batches_tracked = None


def _no_affine(m: torch.nn.BatchNorm2d) -> None:
    m.affine = False
    m.register_parameter('weight', None)
    m.register_parameter('bias', None)


def _cumulative_average(m: torch.nn.BatchNorm2d) -> None:
    m.momentum = None


@pytest.mark.parametrize('variant', [_no_running_stats, _no_affine, _cumulative_average],
                         ids=['no_running_stats', 'no_affine', 'cumulative_average'])
@pytest.mark.parametrize('name', CIFAR)
def test_batchnorm_variants_follow_the_plain_path(name, variant):
    """BatchNorms without running statistics (batch statistics in eval mode too), without affine parameters, and
    with a cumulative running average (momentum None) behave as `nn.BatchNorm2d` does on the plain path."""
    model = randomize_norms(timm.create_model(name)).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            variant(m)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for training in (True, False):
        got, ref = lean_and_plain(model.train(training), x)
        assert_same_step(got, ref, 1e-9)


@pytest.mark.parametrize('name', CIFAR)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_float32_lean_paths_match_float64_truth(ops, name, mode):
    """In float32 the fused kernels and the lean PyTorch-ops path are as close to the float64 result as the plain
    float32 path is. (How close that is depends on the case: random-init nets put some activations next to ReLU
    kinks, where float32 rounding flips a gradient, and MRLA-L's N(0, 1) lambda grows them with depth.)"""
    model = randomize_norms(timm.create_model(name)).train(mode == 'train')
    x = torch.randn(3, 3, 32, 32)
    with lean.disabled():
        truth = step(copy.deepcopy(model).double(), x.double())
        plain = step_error(step(copy.deepcopy(model), x), truth)
    for label, context in (('fused', contextlib.nullcontext), ('pytorch ops', pytorch_ops)):
        with context():
            err = step_error(step(copy.deepcopy(model), x), truth)
        assert err <= max(2e-5, 3 * plain), f'{label}: error {err:.3g} against float64, plain float32 path {plain:.3g}'


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab'])
def test_imagenet_models_at_real_shapes_match_float64(ops, name):
    """ResNet-50 variants at ImageNet-like shapes (160 px, every stage, stage-entry re-summaries, full caches), one
    training step: the fused lean path is as close to the float64 result as plain float32 autograd is."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, drop_path_rate=0.1)).train()
    x = torch.randn(2, 3, 160, 160)
    with lean.disabled():
        truth = step(copy.deepcopy(model).double(), x.double())
        plain = step_error(step(copy.deepcopy(model), x), truth)
    err = step_error(step(model, x), truth)
    assert err <= max(1e-4, 3 * plain), f'lean: error {err:.3g} against float64, plain float32 path {plain:.3g}'


def _branch_cases():
    """(module, pre, shortcut, state, block keep) covering every state case of every family in training."""
    torch.manual_seed(0)
    d = 8
    cases = []
    kcla = [KCLA(32, head_dim=d, drop_path=0.2), KCLA(32, head_dim=d, drop_path=0.2),
            KCLA(64, head_dim=d, in_channels=32, rebuild=True, history_stride=2, drop_path=0.2)]
    cases.append(('kcla', kcla, [(3, 32, 9, 7)] * 2 + [(3, 64, 5, 4)]))
    base = [MRLABase(32, head_dim=d, first_in_stage=f, drop_path=0.2) for f in (True, False, False)]
    cases.append(('mrla_base', base, [(3, 32, 6, 5)] * 3))
    light = [MRLALight(32, head_dim=d, drop_path=0.2) for _ in range(2)]
    cases.append(('mrla_light', light, [(3, 32, 6, 5)] * 2))
    return cases


def _run_chain(mods, shapes, norms, keep, seed=0):
    """The chain's blocks through `forward_tail`, float32; returns (outputs and states, grads of everything)."""
    g = torch.Generator().manual_seed(seed)
    leaves, outs, state = [], [], []
    for m, norm, s in zip(mods, norms, shapes):
        pre = torch.randn(s, generator=g).requires_grad_()
        shortcut = torch.randn(s, generator=g).requires_grad_()
        leaves += [pre, shortcut]
        k = keep[:s[0]] if keep is not None else None
        torch.manual_seed(seed)
        out, state = m.forward_tail(pre, norm, shortcut, k, state)
        outs.append(out)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    total = total + sum((t * torch.randn(t.shape, generator=g)).sum() for t in state if t.is_floating_point())
    params = [p for m, n in zip(mods, norms) for p in list(m.parameters()) + list(n.parameters())]
    grads = torch.autograd.grad(total, leaves + params, allow_unused=True)
    return [o.detach() for o in outs] + [t.detach() for t in state], grads


@pytest.mark.parametrize('kind,mods,shapes', _branch_cases(), ids=lambda v: v if isinstance(v, str) else '')
@pytest.mark.parametrize('norm_mode', ['batch_stats', 'running_stats'])
@pytest.mark.parametrize('drop', [False, True], ids=['no_drop', 'drop'])
def test_fused_kernels_match_pytorch_ops_block_by_block(ops, kind, mods, shapes, norm_mode, drop):
    """Each family's fused forward and backward (tail and branch, every state case, a carried-state gradient
    coming back) equal the PyTorch-ops Functions in float32, and the kernels really ran."""
    results = []
    for context in (contextlib.nullcontext, native.disabled):
        ms = copy.deepcopy(mods)
        norms = [randomize_norms(torch.nn.BatchNorm2d(s[1]), seed=10 + i) for i, s in enumerate(shapes)]
        for i, m in enumerate(ms):
            randomize_norms(m, seed=i)
            m.v.weight.data = torch.randn(m.v.weight.shape, generator=torch.Generator().manual_seed(i)) * 0.3
            m.train(norm_mode == 'batch_stats')
        for n in norms:
            n.train(norm_mode == 'batch_stats')
        keep = torch.tensor([2., 0., 1.25]) if drop else None
        with context():
            if context is contextlib.nullcontext:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    results.append(_run_chain(ms, shapes, norms, keep))
                ran = {e.key for e in prof.key_averages() if e.key.startswith('timm_layerattn::')}
                assert {'timm_layerattn::tail_forward', 'timm_layerattn::tail_backward'} <= ran, ran
                assert any('train_backward' in k for k in ran), ran
            else:
                results.append(_run_chain(ms, shapes, norms, keep))
        results[-1] = results[-1] + (norms,)
    (vals_a, grads_a, norms_a), (vals_b, grads_b, norms_b) = results
    for a, b in zip(vals_a, vals_b):
        assert_close_scaled(a, b, 1e-5)
    n_leaves = 2 * len(shapes)
    for a, b in zip(grads_a[:n_leaves], grads_b[:n_leaves]):
        assert_close_scaled(a, b, 1e-5)
    scale = max(b.abs().max().item() for b in grads_b[n_leaves:] if b is not None)
    for a, b in zip(grads_a[n_leaves:], grads_b[n_leaves:]):
        assert (a is None) == (b is None)
        if a is not None:  # on the scale of all parameter gradients (some sum long chains of small terms)
            assert (a - b).abs().max().item() <= 1e-5 * scale
    for na, nb in zip(norms_a, norms_b):
        torch.testing.assert_close(na.running_var, nb.running_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(na.running_mean, nb.running_mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Exact gradients
# ---------------------------------------------------------------------------------------------------------------


def _bn(c, training, seed):
    return randomize_norms(torch.nn.BatchNorm2d(c), seed=seed).double().train(training)


@pytest.mark.parametrize('training', [True, False], ids=['batch_stats', 'running_stats'])
@pytest.mark.parametrize('function', ['tail', 'kcla', 'kcla_first', 'mrla_light', 'mrla_light_lambda_input',
                                      'mrla_base', 'mrla_base_first'])
def test_gradcheck_float64(function, training):
    """`torch.autograd.gradcheck` of each Function (PyTorch-ops backward, the one the kernels are held to) on
    small float64 shapes, with a drop-path factor."""
    torch.manual_seed(0)
    B, C, H, W = 3, 4, 3, 4
    keep = torch.tensor([1.5, 0., 0.8], dtype=torch.float64)
    dd = dict(dtype=torch.float64)
    pre, shortcut = torch.randn(B, C, H, W, **dd), torch.randn(B, C, H, W, **dd)
    norm3, norm = _bn(C, training, 1), _bn(C, training, 2)
    # the tail's recipe for x, as BlockTail hands it on (its own gradient is BlockTail's business)
    with torch.no_grad():
        _, _, scale, shift = BlockTail.apply(pre, shortcut, norm3.weight, norm3.bias, copy.deepcopy(norm3), keep)
    x = torch.relu(pre * scale[:, :, None, None] + shift[:, :, None, None] + shortcut)
    v_weight = torch.randn(C, 1, 3, 3, **dd)

    def leaf(t):
        return t.detach().clone().requires_grad_()

    if function == 'tail':
        def fn(p, s, w, b):
            out, pooled, _, _ = BlockTail.apply(p, s, w, b, norm3, keep)
            return out, pooled
        args = (leaf(pre), leaf(shortcut), norm3.weight, norm3.bias)
    elif function.startswith('kcla'):
        hist = None if function == 'kcla_first' else leaf(torch.randn(B, C, H, W, **dd))
        weight, gate = leaf(torch.rand(B, C, **dd) * 0.8 + 0.1), leaf(torch.rand(B, C, **dd))

        def fn(x_, h, w_, g_, v_, nw, nb):
            return KCLABranch.apply(x_, pre, shortcut, scale, shift, h, w_, g_, v_, nw, nb, norm, keep)
        args = (leaf(x), hist, weight, gate, leaf(v_weight), norm.weight, norm.bias)
    elif function == 'mrla_light':
        lam = leaf(torch.randn(C, 1, 1, **dd))

        def fn(x_, s_, g_, v_, l_, nw, nb):
            return MRLALightBranch.apply(x_, pre, s_, scale, shift, g_, v_, l_, nw, nb, norm, keep)
        args = (leaf(x), leaf(shortcut), leaf(torch.rand(B, C, **dd)), leaf(v_weight), lam, norm.weight, norm.bias)
    elif function == 'mrla_light_lambda_input':  # DLA-light: lambda scales another map than the tail's shortcut
        lam = leaf(torch.randn(C, 1, 1, **dd))

        def fn(x_, r_, g_, v_, l_, nw, nb):
            return MRLALightBranch.apply(x_, pre, shortcut, scale, shift, g_, v_, l_, nw, nb, norm, keep, r_)
        args = (leaf(x), leaf(torch.randn(B, C, H, W, **dd)), leaf(torch.rand(B, C, **dd)), leaf(v_weight), lam,
                norm.weight, norm.bias)
    else:
        earlier = [] if function == 'mrla_base_first' else [leaf(torch.randn(B, C, H, W, **dd)) for _ in range(2)]
        weights = leaf(torch.rand(B, len(earlier) + 1, C, **dd))

        def fn(x_, w_, v_, nw, nb, *values):
            return MRLABaseBranch.apply(x_, pre, shortcut, scale, shift, w_, v_, nw, nb, norm, keep, *values)
        args = (leaf(x), weights, leaf(v_weight), norm.weight, norm.bias, *earlier)
    with native.disabled():
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# What backward keeps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name,limit', [('resnet50_kcla', 1.2), ('resnet50_mrlal', 1.06), ('resnet50_mrlab', 1.2)])
def test_saved_activation_memory(name, limit):
    """Bytes autograd keeps for backward (unique storages), relative to timm's resnet50 at the same input: the
    lean path stays under the limit (about what it measures, plus a margin) and well under the plain path."""
    x = torch.randn(2, 3, 96, 96)
    base = activation_bytes(timm.create_model('resnet50'), x)
    model = timm.create_model(name)
    lean_ratio = activation_bytes(model, x) / base
    with lean.disabled():
        plain_ratio = activation_bytes(model, x) / base
    assert lean_ratio <= limit, f'{name}: {lean_ratio:.3f} x resnet50 > {limit}'
    assert lean_ratio < plain_ratio - 0.1, (lean_ratio, plain_ratio)


@pytest.mark.parametrize('name', CIFAR)
def test_lean_nodes_keep_tensors_only_in_saved_tensors(ops, name):
    """Nothing tensor-valued is stashed on the Functions' ctx (it would hide memory from saved-tensor hooks,
    checkpointing and the memory counts); `ctx.saved_tensors` holds what they keep."""
    model = timm.create_model(name).train()
    out = model(torch.randn(2, 3, 16, 16))
    nodes = [n for n in graph_nodes(out) if type(n).__name__ in LEAN_NODES]
    assert nodes
    for node in nodes:
        for key, value in vars(node).items():
            assert not isinstance(value, torch.Tensor), f'{type(node).__name__}.{key} is a tensor'
            assert not (isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)), key
        assert node.saved_tensors  # accessible, i.e. kept through save_for_backward


# ---------------------------------------------------------------------------------------------------------------
# Training features
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', CIFAR)
def test_grad_checkpointing_gives_the_same_gradients(name):
    """Activation checkpointing (re-running whole blocks, state and RNG included) over the lean path."""
    model = randomize_norms(timm.create_model(name, drop_path_rate=0.2)).double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with lean.forced():
        ref = step(copy.deepcopy(model), x)
        model.set_grad_checkpointing(True)
        got = step(model, x)
        assert lean_node_names(model(x.clone().requires_grad_())), 'the checkpointed blocks should run the lean path'
    ref[3].update({k: v for k, v in got[3].items() if 'running' in k or 'num_batches' in k})  # updated twice
    assert_same_step(got, ref, 1e-10)


@pytest.mark.parametrize('name', ['resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab'] + CIFAR)
def test_every_parameter_gets_a_gradient(name):
    """No unused parameters: DDP with find_unused_parameters=False needs every parameter in the graph."""
    model = timm.create_model(name).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('name', CIFAR)
def test_compile_fullgraph_training_step_matches_eager(name):
    """`torch.compile(fullgraph=True)` traces the plain ops (the lean Functions are eager-only) and its training
    step gives the eager lean path's gradients."""
    torch._dynamo.reset()
    model = randomize_norms(timm.create_model(name)).train()
    x = torch.randn(2, 3, 16, 16)
    ref = step(copy.deepcopy(model), x)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    got = step(compiled, x)
    assert_same_step(got, ref, 1e-4)


def _scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 0.05), (torch.float16, 0.01)], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('kind,mods,shapes', _branch_cases(), ids=lambda v: v if isinstance(v, str) else '')
def test_autocast_blocks_are_as_accurate_as_the_plain_path(kind, mods, shapes, dtype, tol):
    """Under CPU autocast the lean Functions run in the feature dtype (statistics, carried sums and per-channel
    maths in float32): finite, and as close to the float32 result as the plain path under autocast is, output by
    output and gradient by gradient (a few gradients of these random blocks are ill-conditioned in half
    precision whichever path computes them)."""
    def run(half: bool, plain: bool):
        ms = copy.deepcopy(mods)
        norms = [randomize_norms(torch.nn.BatchNorm2d(s[1]), seed=10 + i) for i, s in enumerate(shapes)]
        for i, m in enumerate(ms):
            randomize_norms(m, seed=i).train()
            m.drop_path = torch.nn.Identity()  # masks drawn in different dtypes need not match
        with torch.autocast('cpu', dtype=dtype, enabled=half):
            g = torch.Generator().manual_seed(0)
            outs, state, leaves = [], [], []
            for m, norm, s in zip(ms, norms, shapes):
                pre = torch.randn(s, generator=g).to(dtype if half else torch.float32).requires_grad_()
                shortcut = torch.randn(s, generator=g).to(pre.dtype).requires_grad_()
                leaves += [pre, shortcut]
                if plain:
                    with lean.disabled():
                        out, state = m(torch.relu(norm(pre) + shortcut), shortcut, state)
                else:
                    out, state = m.forward_tail(pre, norm, shortcut, None, state)
                outs.append(out)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        return [o.detach().float() for o in outs] + [g.float() for g in torch.autograd.grad(loss, leaves)]
    ref = run(half=False, plain=True)
    plain = run(half=True, plain=True)
    got = run(half=True, plain=False)
    for i, (a, p, r) in enumerate(zip(got, plain, ref)):
        assert torch.isfinite(a).all()
        err, plain_err = _scaled_error(a, r), _scaled_error(p, r)
        assert err <= max(tol, 1.5 * plain_err), \
            f'result {i}: error {err:.3g}, plain path under autocast {plain_err:.3g}'


@pytest.mark.parametrize('name', CIFAR)
def test_frozen_norms_and_channels_last_take_the_lean_path_correctly(name):
    """Detection-style training (every BatchNorm in eval mode, `norm_eval`) and channels_last maps (PyTorch ops,
    not the NCHW kernels) give the plain path's gradients."""
    model = randomize_norms(timm.create_model(name)).double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    got, ref = lean_and_plain(model, x)
    assert_same_step(got, ref, 1e-10)
    model = randomize_norms(timm.create_model(name)).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    got, ref = lean_and_plain(model, x)
    assert_same_step(got, ref, 1e-4)


@pytest.mark.parametrize('name', ['resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab'])
def test_every_block_takes_the_lean_path_by_default(ops, name):
    """Float32 CPU training in the default mode: every block (stage entries, MRLA-B's growing caches, KCLA's
    re-summaries) runs the lean Functions on the fused kernels."""
    model = timm.create_model(name).train()
    blocks = sum(1 for m in model.modules() if isinstance(m, (KCLA, MRLALight, MRLABase)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        names = lean_node_names(model(torch.randn(2, 3, 64, 64)))
    assert len(names) == 2 * blocks, names
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get('timm_layerattn::tail_forward') == blocks


def test_switches_and_fallbacks(ops, monkeypatch):
    """The lean path is the default for training with autograd where it pays: on CPU, where the fused kernels
    run (float32 NCHW); bfloat16 autocast and channels_last keep plain autograd unless forced.
    `TIMM_LAYERATTN_LEAN=0` / `=1`, `lean.disabled()` / `lean.forced()`, no autograd, SyncBatchNorm, an empty
    batch and the meta device keep the plain modules."""
    model = timm.create_model('cifar_resnet20_kcla').train()
    x = torch.randn(2, 3, 16, 16)
    assert lean.mode() == 'auto' and lean_node_names(model(x))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not lean_node_names(model(x))
        with lean.forced():
            assert lean_node_names(model(x))
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not lean_node_names(cl(xc))
    with lean.disabled():
        assert not lean_node_names(model(x))
    monkeypatch.setenv(lean.ENV, '1')
    assert lean.mode() == 'on' and lean_node_names(cl(xc))
    with lean.disabled():
        assert not lean_node_names(cl(xc))
    monkeypatch.setenv(lean.ENV, '0')
    assert lean.mode() == 'off' and not lean_node_names(model(x))
    with lean.forced():
        assert lean_node_names(model(x))
    monkeypatch.delenv(lean.ENV)
    with torch.no_grad():
        assert model(x).grad_fn is None
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    attn = next(m for m in synced.modules() if isinstance(m, KCLA))
    assert not attn.tail_usable(torch.randn(2, attn.channels, 4, 4), torch.randn(2, attn.channels, 4, 4), [])
    assert not lean.usable(torch.randn(0, 4, 3, 3))
    assert model(torch.randn(0, 3, 16, 16)).shape == (0, 10)
    meta = torch.randn(2, 4, 3, 3, device='meta')
    with lean.forced():  # the Functions switch autocast off, which the meta device does not support
        assert not lean.usable(meta, meta)


@pytest.mark.parametrize('variant', ['batch_stats', 'frozen', 'no_affine', 'cumulative_average'])
def test_norm_relu_matches_float64(ops, variant):
    """A block's inner BatchNorm + ReLU on the fused kernels (`NormReLU`): output, input / weight / bias gradients
    and the running statistics as `relu(nn.BatchNorm2d(u))` computes them in float64 (batch or running
    statistics, without affine parameters, with a cumulative average); a gradient of the gradient replays the
    PyTorch maths."""
    torch.manual_seed(0)
    norm = randomize_norms(torch.nn.BatchNorm2d(6)).train(variant != 'frozen')
    if variant == 'no_affine':
        _no_affine(norm)
    if variant == 'cumulative_average':
        _cumulative_average(norm)
    u = torch.randn(3, 6, 5, 7)
    grad = torch.randn(3, 6, 5, 7)
    ref_norm = copy.deepcopy(norm).double()
    u64 = u.double().requires_grad_()
    out64 = torch.relu(ref_norm(u64))
    ref = [out64] + list(torch.autograd.grad(out64, [u64] + list(ref_norm.parameters()), grad.double()))
    leaf = u.clone().requires_grad_()
    out = NormReLU.apply(leaf, norm.weight, norm.bias, norm)
    got = [out] + list(torch.autograd.grad(out, [leaf] + list(norm.parameters()), grad))
    for a, b in zip(got, ref):
        assert_close_scaled(a.double(), b, 1e-5)
    for (n, b), b64 in zip(norm.named_buffers(), ref_norm.buffers()):
        torch.testing.assert_close(b.double(), b64.double(), rtol=1e-5, atol=1e-6, msg=n)

    def penalty(fn, t):
        g = torch.autograd.grad((fn(t) * grad.to(t.dtype)).sum(), t, create_graph=True)[0]
        return torch.autograd.grad(g.square().sum(), t)[0]
    frozen = copy.deepcopy(norm).eval() if variant == 'frozen' else copy.deepcopy(norm)
    frozen64 = copy.deepcopy(frozen).double()
    got = penalty(lambda t: NormReLU.apply(t, frozen.weight, frozen.bias, frozen), u.clone().requires_grad_())
    ref = penalty(lambda t: torch.relu(frozen64(t)), u.double().requires_grad_())
    assert_close_scaled(got.double(), ref, 1e-4)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_resnet20_eca', 'resnet18_kcla'])
def test_inner_norm_relus_take_the_fused_path(ops, name):
    """Training on float32 CPU maps: every block's inner BatchNorm + ReLU (two in a bottleneck, one in a basic
    block) runs as one fused forward op; lean path off, channels_last, frozen norms, CPU autocast or no autograd
    keep the modules."""
    model = timm.create_model(name).train()
    x = torch.randn(2, 3, 64, 64)  # no 1 x 1 maps, which are contiguous channels_last too
    pairs = sum(len(b.inner_norm_acts()) for b in model.modules() if isinstance(b, LABlock))

    def calls(m, t):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            m(t).sum().backward()
        counts = {e.key: e.count for e in prof.key_averages()}
        return counts.get('timm_layerattn::norm_relu_forward', 0), counts.get('timm_layerattn::norm_relu_backward', 0)
    assert pairs and calls(model, x) == (pairs, pairs)
    with lean.disabled():
        assert calls(model, x) == (0, 0)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert calls(cl, x.contiguous(memory_format=torch.channels_last)) == (0, 0)
    assert calls(copy.deepcopy(model).eval(), x) == (0, 0)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # float32 input, bfloat16 conv outputs
        assert calls(model, x) == (0, 0)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    assert not any(e.key == 'timm_layerattn::norm_relu_forward' for e in prof.key_averages())


def test_batchnorm_refuses_one_value_per_channel_in_training():
    """As nn.BatchNorm2d: batch statistics of a single value are an error naming the input size."""
    model = timm.create_model('cifar_resnet20_mrlal').train()
    with pytest.raises(ValueError, match='Expected more than 1 value per channel when training'):
        model(torch.randn(1, 3, 4, 4))


def test_training_kernels_are_thread_count_independent(ops):
    """Per-plane partial sums reduced over the batch in a fixed order: every training kernel gives bit-identical
    results with one and with two threads."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 3, 96, 11, 9  # 288 planes: more than one parallel chunk each (the grain is 2^14 elements)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)
    pre, r, hist, go, gh, v1, v2 = (rnd(B, C, H, W) for _ in range(7))
    s, t, w, gate, a, b = rnd(B, C).abs(), rnd(B, C), rnd(B, C).sigmoid(), rnd(B, C).sigmoid(), rnd(B, C), rnd(B, C)
    vw, lam, mean, invstd, nw = rnd(C, 1, 3, 3), rnd(C, 1, 1), rnd(C), rnd(C).abs() + 0.5, rnd(C)
    keep, weights = torch.tensor([1.25, 0., 1.25]), rnd(B, 3, C).softmax(1)
    calls = [
        lambda: ops.plane_moments(pre),
        lambda: ops.tail_forward(pre, r, s, t),
        lambda: ops.tail_backward(pre, r, s, t, go, gate, mean, invstd, nw, keep, True),
        lambda: ops.kcla_train_values(pre, hist, w, gate, vw),
        lambda: ops.kcla_train_backward(pre, r, s, t, hist, w, gate, vw, a, b, keep, mean, invstd, nw, True, go, gh),
        lambda: ops.mrla_light_train_values(pre, r, gate, vw, lam),
        lambda: ops.mrla_light_train_backward(pre, r, s, t, gate, vw, lam, keep, mean, invstd, nw, True, go),
        lambda: ops.mrla_base_train_values(pre, [v1, v2], weights, vw),
        lambda: ops.mrla_base_train_backward(pre, r, s, t, [v1, v2], weights, vw, a, b, keep, mean, invstd, nw, True,
                                             go, gh),
    ]
    threads = torch.get_num_threads()

    def flat(result):
        if isinstance(result, torch.Tensor):
            return [result]
        return [t for item in result for t in flat(item)]
    try:
        torch.set_num_threads(1)
        one = [flat(c()) for c in calls]
        torch.set_num_threads(2)
        two = [flat(c()) for c in calls]
    finally:
        torch.set_num_threads(threads)
    for i, (x, y) in enumerate(zip(one, two)):
        assert all(torch.equal(p, q) for p, q in zip(x, y)), f'call {i} differs between 1 and 2 threads'


@pytest.mark.parametrize('call,fragment', [
    (lambda o: o.tail_forward(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2), torch.ones(2, 4), torch.ones(2, 4)),
     'shortcut must have shape'),
    (lambda o: o.tail_forward(torch.randn(2, 4, 3, 3).double(), torch.randn(2, 4, 3, 3), torch.ones(2, 4),
                              torch.ones(2, 4)), 'must be a float32 CPU tensor'),
    (lambda o: o.kcla_train_values(torch.randn(2, 4, 3, 3), None, torch.ones(2, 4), torch.ones(2, 3),
                                   torch.ones(4, 1, 3, 3)), 'gate must have shape'),
    (lambda o: o.mrla_base_train_values(torch.randn(2, 4, 3, 3), [torch.randn(2, 4, 3, 3)], torch.ones(2, 1, 4),
                                        torch.ones(4, 1, 3, 3)), 'weights must have shape'),
    (lambda o: o.mrla_light_train_values(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.ones(2, 4),
                                         torch.ones(4, 1, 3, 3), torch.ones(4)), 'lambda_t must have shape'),
    (lambda o: o.plane_moments(torch.randn(2, 4, 3)), 'must be a 4-D'),
    (lambda o: o.norm_relu_forward(torch.randn(2, 4, 3, 3), torch.ones(2, 3), torch.ones(2, 4)), 'scale must have shape'),
    (lambda o: o.norm_relu_backward(torch.randn(2, 4, 3, 3), torch.ones(2, 4), torch.ones(2, 4), torch.randn(2, 4, 3, 2),
                                    torch.zeros(4), torch.ones(4), torch.ones(4), True), 'grad_y must have shape'),
])
def test_training_kernels_reject_bad_input_with_clear_errors(ops, call, fragment):
    with pytest.raises(RuntimeError, match=fragment):
        call(ops)
