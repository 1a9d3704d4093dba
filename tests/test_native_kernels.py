"""The fused CPU inference kernels (`timm_layerattn/layers/csrc`): parity with the PyTorch paths block by block,
when they are used, input checks, build cache and fallback. Each family's kernel against its formulas and whole
networks with and without the kernels are in tests/test_kcla.py and tests/test_mrla.py; the `ops` fixture
is in tests/conftest.py."""
import re
import warnings

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import MRLALight, native

from _layer_attn import (
    CHAINS, assert_close_scaled, assert_same_step, kernel_calls, layer_attn_chain, randomize_norms, record_paths,
    run_path)
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
    sources = ', '.join(f.name for f in native.SOURCES)  # every source file is named
    assert 'layer_attn_cpu.cpp' in sources and 'layer_attn_tokens_cpu.cpp' in sources
    with pytest.raises(native.NativeKernelError, match=f'compiling {re.escape(sources)} with false failed'):
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


TRAINING_OPS = ['norm_plane_affine', 'channel_conv', 'channel_conv_backward', 'plane_moments', 'tail_forward',
                'tail_backward', 'affine_residual_', 'kcla_train_values', 'kcla_train_backward',
                'mrla_light_train_values', 'mrla_light_train_backward', 'mrla_base_train_values',
                'mrla_base_train_backward']


@pytest.mark.parametrize('name', ['kcla_', 'mrla_light_', 'mrla_base_'] + TRAINING_OPS)
def test_wrappers_take_the_op_schema_arguments(ops, name):
    """The typed wrappers in `native` take the op's arguments by their schema names, in schema order; the
    inference ops take everything after `x` keyword-only, the training ops at most their leading maps positionally,
    and keyword-only from the first non-tensor argument on (the wrappers pass those by name)."""
    import inspect
    params = list(inspect.signature(getattr(native, name)).parameters.values())
    schema = getattr(ops, name).default._schema.arguments
    assert [p.name for p in params] == [a.name for a in schema]
    assert params[0].kind is params[0].POSITIONAL_OR_KEYWORD
    if name in ('kcla_', 'mrla_light_', 'mrla_base_'):
        assert all(p.kind is p.KEYWORD_ONLY for p in params[1:])
    else:
        positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert all(str(a.type) == 'Tensor' for a in schema[:len(positional)]), (name, positional)
        assert all(p.kind is p.KEYWORD_ONLY for p in params[len(positional):])
