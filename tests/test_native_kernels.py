"""The fused CPU inference kernels (`timm_layerattn/layers/csrc`): build, parity with the PyTorch path, fallback."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import native

from test_layer_math import assert_close_scaled, randomize_norms

SHAPES = [(2, 3, 5, 7), (1, 2, 1, 1), (2, 4, 1, 6), (3, 5, 6, 1), (2, 16, 9, 9), (1, 8, 32, 3), (4, 64, 14, 14)]


@pytest.fixture(scope='module')
def ops():
    if native._compiler() is None:
        pytest.skip('no C++ compiler on this machine: the kernels cannot be built (the PyTorch path is used)')
    assert native.available(), native.last_error()
    return torch.ops.timm_layerattn


def dw3(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=1, groups=x.shape[1])


def col(t: torch.Tensor) -> torch.Tensor:
    """[B, C] or [C] -> broadcastable over H, W."""
    return t[..., None, None]


@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_dw3x3_equals_conv2d(ops, shape):
    x, w = torch.randn(shape), torch.randn(shape[1], 1, 3, 3)
    torch.testing.assert_close(ops.dw3x3(x, w), dw3(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_mrla_light_kernel_formula_in_place(ops, shape):
    b, c = shape[:2]
    x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(c, 1, 3, 3)
    a, lam, s = torch.randn(b, c), torch.randn(c), torch.randn(c)
    ref = x + col(a) * dw3(x, w) + col(lam) * r + col(s)
    x_in = x.clone()
    out = ops.mrla_light_(x_in, r, w, a, lam, s)
    assert out.data_ptr() == x_in.data_ptr()  # the block output is updated in place
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fresh', [False, True], ids=['update', 'fresh'])
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_kcla_kernel_formula_updates_history_and_output(ops, shape, fresh):
    b, c = shape[:2]
    x, hist, w = torch.randn(shape), torch.randn(shape), torch.randn(c, 1, 3, 3)
    wl, a, s = torch.rand(b, c), torch.randn(b, c), torch.randn(c)
    new_hist = col(wl) * x if fresh else torch.lerp(hist, x, col(wl))
    ref = x + torch.relu(col(a) * dw3(new_hist, w) + col(s))
    x_in, hist_in = x.clone(), torch.empty_like(x) if fresh else hist.clone()
    out = ops.kcla_(x_in, hist_in, wl, w, a, s, fresh)
    assert out.data_ptr() == x_in.data_ptr()
    torch.testing.assert_close(hist_in, new_hist, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('earlier', [0, 1, 4])
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_mrla_base_kernel_formula_writes_value_and_output(ops, shape, earlier):
    b, c = shape[:2]
    x, w = torch.randn(shape), torch.randn(c, 1, 3, 3)
    values = [torch.randn(shape) for _ in range(earlier)]
    weights, s = torch.randn(b, earlier + 1, c), torch.randn(c)
    v_t = dw3(x, w)
    attn = sum(col(weights[:, j]) * v for j, v in enumerate(values + [v_t]))
    ref = x + torch.relu(attn + col(s))
    x_in, value = x.clone(), torch.empty_like(x)
    out = ops.mrla_base_(x_in, value, values, weights, w, s)
    assert out.data_ptr() == x_in.data_ptr()
    torch.testing.assert_close(value, v_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernels_are_thread_count_independent(ops):
    """Planes are split across threads; the result must not depend on how."""
    x, r, w = torch.randn(3, 40, 17, 19), torch.randn(3, 40, 17, 19), torch.randn(40, 1, 3, 3)
    a, lam, s = torch.randn(3, 40), torch.randn(40), torch.randn(40)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.mrla_light_(x.clone(), r, w, a, lam, s))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_kernels_reject_bad_input_with_clear_errors(ops):
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    a, s = torch.randn(2, 4), torch.randn(4)
    with pytest.raises(RuntimeError, match='float32'):
        ops.mrla_light_(x.double(), x.double(), w, a, s, s)
    with pytest.raises(RuntimeError, match='contiguous'):
        ops.mrla_light_(x.contiguous(memory_format=torch.channels_last), x, w, a, s, s)
    with pytest.raises(RuntimeError, match='weight must have shape'):
        ops.dw3x3(x, torch.randn(4, 1, 5, 5))
    with pytest.raises(RuntimeError, match='shortcut must have shape'):
        ops.mrla_light_(x, torch.randn(2, 4, 5, 6), w, a, s, s)
    with pytest.raises(RuntimeError, match='4-D'):
        ops.dw3x3(x[0], w)
    with pytest.raises(RuntimeError, match='weights must have shape'):
        ops.mrla_base_(x, torch.empty_like(x), [torch.randn_like(x)], torch.randn(2, 1, 4), w, s)


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
        with FlopCounterMode(display=False):
            assert not native.usable(x)


FAMILIES = [('cifar_resnet20_kcla', 32), ('cifar_resnet20_mrlal', 32), ('cifar_resnet20_mrlab', 32),
            ('cifar_resnet56_kcla', 11), ('resnet50_kcla', 67), ('resnet50_mrlal', 67), ('resnet50_mrlab', 67)]


def _kernel_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return sum(e.count for e in prof.key_averages() if e.key.startswith('timm_layerattn::'))


@pytest.mark.parametrize('name,size', FAMILIES, ids=[n for n, _ in FAMILIES])
def test_models_with_kernels_match_pytorch_path(ops, name, size):
    """Whole networks (every block, stage changes, KCLA re-summaries, MRLA-B caches) give the same logits
    and features with and without the kernels, and the kernels really run once per block."""
    model = randomize_norms(timm.create_model(name, num_classes=7)).eval()
    x = torch.randn(2, 3, size, size + 5)
    with torch.inference_mode():
        with native.disabled():
            ref = model(x)
            ref_feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
        calls = _kernel_calls(model, x)
    # float32 rounding differs (summation order) and grows with depth in these random-weight nets
    assert_close_scaled(out, ref, tol=1e-4)
    for f, r in zip(feats, ref_feats):
        assert_close_scaled(f, r, tol=1e-4)
    assert calls == sum(1 for m in model.modules() if isinstance(m, timm_layerattn.layers.LayerAttnBase))
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
