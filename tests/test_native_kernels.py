"""The fused CPU inference kernels (`timm_layerattn/layers/csrc`): the papers' formulas, parity with the
PyTorch path, when they are used, input checks, build cache and fallback."""
import warnings

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, LayerAttnBase, MRLABase, MRLALight, native

from _reference import ref_kcla, ref_mrla_base, ref_mrla_light
from test_layer_math import (
    CHAINS, assert_close_scaled, assert_same_step, layer_attn_chain, randomize_norms, record_paths, run_path)

# (H, W) of a first stage; the next stage is half that (rounded up), as after a stride-2 block
SIZES = [(9, 7), (1, 1), (1, 6), (6, 1), (14, 14)]


@pytest.fixture(scope='module')
def ops():
    if native._compiler() is None:
        pytest.skip('no C++ compiler on this machine: the kernels cannot be built (the PyTorch path is used)')
    assert native.available(), native.last_error()
    return torch.ops.timm_layerattn


def kernel_calls(fn) -> int:
    """How many of the package's native ops `fn()` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith('timm_layerattn::'))


def half(hw):
    return tuple((s + 1) // 2 for s in hw)


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


def test_kernels_are_thread_count_independent(ops):
    """Planes are split across threads; the result must not depend on how."""
    mod = randomize_norms(MRLALight(40, head_dim=8)).eval()
    x, r = torch.randn(3, 40, 17, 19), torch.randn(3, 40, 17, 19)
    threads = torch.get_num_threads()
    outs = []
    try:
        with torch.no_grad():
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(mod(x.clone(), r, [])[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_kernels_reject_bad_input_with_clear_errors(ops):
    mod = MRLALight(8, head_dim=4).eval()
    x, w, q, lam = torch.randn(2, 8, 5, 5), mod.v.weight.detach(), mod.q.weight.detach(), mod.lambda_t.detach()
    s = torch.ones(8)

    def light(x=x, r=x, w=w, q=q, lam=lam, s=s, head_dim=4):
        return ops.mrla_light_(x, r, w, q, q, lam, s, s, head_dim, 0.5)

    with pytest.raises(RuntimeError, match='float32'):
        light(x=x.double(), r=x.double())
    with pytest.raises(RuntimeError, match='contiguous'):
        light(x=x.contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match='4-D'):
        light(x=x[0])
    with pytest.raises(RuntimeError, match='shortcut must have shape'):
        light(r=torch.randn(2, 8, 5, 6))
    with pytest.raises(RuntimeError, match='v_weight must have shape'):
        light(w=torch.randn(8, 1, 5, 5))
    with pytest.raises(RuntimeError, match='odd k'):
        light(q=torch.randn(1, 1, 4))
    with pytest.raises(RuntimeError, match='head_dim'):
        light(head_dim=3)
    with pytest.raises(RuntimeError, match='keys must be given'):
        ops.mrla_base_(x, torch.empty_like(x), [torch.randn_like(x)], None, w, q, q, s, s, 4, 0.5)
    with pytest.raises(RuntimeError, match='hist must not alias x'):
        ops.kcla_(x, x, None, w, q, q, torch.ones(2), torch.ones(2, 2), s, s, 4, 1e-3, 10., 1e-12)


def test_usable_only_for_eager_float32_nchw_without_autograd(ops):
    x = torch.randn(2, 4, 5, 5)
    assert not native.usable(x)  # autograd on
    with torch.no_grad():
        assert native.usable(x)
        assert not native.usable(x.double())
        assert not native.usable(x.contiguous(memory_format=torch.channels_last))
        assert not native.usable(x.to(torch.bfloat16))
        with native.disabled():
            assert not native.usable(x)
        assert native.usable(x)
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False):  # counters must see the aten ops
            assert not native.usable(x)


def test_jit_traced_models_use_plain_ops(ops):
    """torch.jit.trace records the PyTorch ops (a saved trace then runs anywhere) and still matches."""
    model = randomize_norms(timm.create_model('cifar_resnet20_mrlal')).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x)
    assert 'timm_layerattn::' not in str(traced.inlined_graph)
    with torch.no_grad():
        assert_close_scaled(traced(x), ref, tol=1e-5)


FAMILIES = [('cifar_resnet20_kcla', 32), ('cifar_resnet20_mrlal', 32), ('cifar_resnet20_mrlab', 32),
            ('cifar_resnet56_kcla', 11), ('resnet50_kcla', 67), ('resnet50_mrlal', 67), ('resnet50_mrlab', 67)]


@pytest.mark.parametrize('name,size', FAMILIES, ids=[n for n, _ in FAMILIES])
def test_models_with_kernels_match_pytorch_path(ops, name, size):
    """Whole networks (every block, stage changes, KCLA re-summaries, MRLA-B caches) give the same logits
    and features with and without the kernels, and every attention block runs its kernel."""
    model = randomize_norms(timm.create_model(name, num_classes=7)).eval()
    x = torch.randn(2, 3, size, size + 5)
    with torch.inference_mode():
        with native.disabled():
            ref = model(x)
            ref_feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
        calls = kernel_calls(lambda: model(x))
    # float32 rounding differs (summation order) and grows with depth in these random-weight nets
    assert_close_scaled(out, ref, tol=1e-4)
    for f, r in zip(feats, ref_feats):
        assert_close_scaled(f, r, tol=1e-4)
    assert calls == sum(1 for m in model.modules() if isinstance(m, LayerAttnBase))
    with torch.no_grad():  # no_grad takes the same path as inference_mode
        assert_close_scaled(model(x), ref, tol=1e-4)


def test_flop_count_is_the_same_with_kernels(ops):
    """FLOP counters (dispatch modes) see the PyTorch ops, so real CPU tensors count like meta ones."""
    from timm_layerattn.tools.zoo import count_macs
    model = timm.create_model('cifar_resnet20_mrlab').eval()
    with native.disabled():
        ref = count_macs(model, (3, 32, 32), device='cpu')
    assert count_macs(model, (3, 32, 32), device='cpu') == ref > 0


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    """No compiler (or a broken one): one RuntimeWarning, then the PyTorch path with the same results."""
    model = randomize_norms(timm.create_model('cifar_resnet20_mrlal')).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), native.disabled():
        ref = model(x)

    def broken_build():
        raise native.NativeKernelError('no C++ compiler found (test)')

    monkeypatch.setattr(native, 'build', broken_build)
    monkeypatch.setattr(native, '_loaded', None)
    monkeypatch.setattr(native, '_error', None)
    monkeypatch.delenv(native.ENV, raising=False)
    with pytest.warns(RuntimeWarning, match='fused CPU kernels are unavailable.*no C\\+\\+ compiler'):
        with torch.no_grad():
            out = model(x)
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # only the first attempt warns
        with torch.no_grad():
            model(x)
    assert 'no C++ compiler' in native.last_error()

    monkeypatch.setattr(native, '_loaded', None)
    monkeypatch.setenv(native.ENV, '1')  # required: an error instead of the fallback
    with pytest.raises(native.NativeKernelError, match='TIMM_LAYERATTN_NATIVE=1'):
        with torch.no_grad():
            model(x)


def test_env_off_disables_kernels(ops, monkeypatch):
    monkeypatch.setenv(native.ENV, '0')
    assert native.mode() == 'off' and not native.available()
    with torch.no_grad():
        assert not native.usable(torch.randn(1, 2, 3, 3))


def test_build_is_cached_atomic_and_reports_compiler_errors(ops, tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_LAYERATTN_CACHE', str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path / 'kernels' and path.suffix == '.so'
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime  # cached: not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind

    monkeypatch.setenv('CXX', 'false')  # a "compiler" that always fails
    with pytest.raises(native.NativeKernelError, match='compiling layer_attn_cpu.cpp with false failed'):
        native.build()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_kernels_cli(ops, capsys, monkeypatch):
    from timm_layerattn.cli import main
    assert main(['kernels']) == 0
    assert 'fused CPU kernels: ready' in capsys.readouterr().out
    monkeypatch.setenv(native.ENV, '0')
    assert main(['kernels']) == 1
    assert 'off' in capsys.readouterr().out


@pytest.mark.parametrize('kind', CHAINS)
def test_native_path_agrees_with_pytorch_paths(ops, kind):
    """In eval mode the fused op equals the folded path and the reference path (the eval-mode BatchNorm
    applied as a module), in output and carried state, block by block."""
    state = []
    for mod, x, r in layer_attn_chain(kind):
        ref = run_path(mod, 'reference', x, r, state)
        with torch.no_grad():
            assert kernel_calls(lambda: run_path(mod, 'native', x, r, state)) == 1
        native_step = run_path(mod, 'native', x, r, state)
        assert_same_step(native_step, ref)
        assert_same_step(native_step, run_path(mod, 'folded', x, r, state))
        state = ref[1]


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize('kind', CHAINS)
def test_forward_takes_native_path_exactly_when_usable(ops, kind):
    """The fused op runs in eval mode with autograd off when `native.usable` accepts `x` and the tensors the
    op reads (the state for KCLA and MRLA-B, the shortcut for MRLA-L); the folded path runs otherwise."""
    (first, x0, r0), (mod, x, r) = layer_attn_chain(kind)[:2]
    state = run_path(first, 'reference', x0, r0, [])[1]
    taken = record_paths(mod)
    with torch.no_grad():
        mod(x.clone(), r, [t.clone() for t in state])
        mod(x.clone(), strided_copy(r), [t.clone() for t in state])
        mod(strided_copy(x), r, [t.clone() for t in state])
        mod(x.clone(), r, [strided_copy(t) for t in state])
    mod(x.clone(), r, [t.clone() for t in state])  # autograd on
    reads_shortcut, reads_state = kind == 'mrla_light', kind != 'mrla_light'
    assert taken == [
        'native',
        'folded' if reads_shortcut else 'native',
        'folded',
        'folded' if reads_state else 'native',
        'folded',
    ]


@pytest.mark.parametrize('name', ['kcla_', 'mrla_light_', 'mrla_base_'])
def test_wrappers_take_the_op_schema_arguments(ops, name):
    """The typed wrappers in `native` take the op's arguments by their schema names, in schema order,
    everything after `x` keyword-only."""
    import inspect
    params = list(inspect.signature(getattr(native, name)).parameters.values())
    assert [p.name for p in params] == [a.name for a in getattr(ops, name).default._schema.arguments]
    assert params[0].kind is params[0].POSITIONAL_OR_KEYWORD
    assert all(p.kind is p.KEYWORD_ONLY for p in params[1:])
