"""Fused CPU kernels for the layer-attention branches (inference and training), compiled on first use.

On CPU the attention branches are memory-bound: PyTorch runs the depth-wise value conv through oneDNN,
which reorders NCHW maps through blocked copies, then needs several full-size elementwise passes for the
gates, the BatchNorm and the residual, and dozens of tiny ops per block for the gates themselves.
`csrc/layer_attn_cpu.cpp` computes a block's whole inference branch in one op, with one pass over the
full-size maps; `csrc/layer_attn_train_cpu.cpp` holds the forward and backward kernels of the memory-lean
training Functions (`lean`, `kcla`, `mrla`), which recompute what they do not keep plane by plane in L1, and
`csrc/layer_attn_tokens_cpu.cpp` the inference branches of the vision transformers' token grids (`vit_la`). All
are compiled here with the system C++ compiler against the installed torch (about 10 s, once per machine: the
library is cached under `~/.cache/timm-layerattn/kernels`, keyed by the sources, torch build, compiler and CPU)
and registered as `torch.ops.timm_layerattn.*`.

The inference ops are used only where they apply: eval mode, float32 CPU tensors in contiguous NCHW, autograd
off (`torch.no_grad` / `torch.inference_mode`), eager execution (`usable`). The training ops run inside the
autograd Functions on float32 contiguous CPU tensors (`trainable`). Everything else (other dtypes or layouts,
TorchScript, tracing, `torch.compile`, which fuses on its own) takes PyTorch ops, which compute the same
result. If no compiler is found or the build fails, a single warning says so and PyTorch ops are used
throughout.

`TIMM_LAYERATTN_NATIVE=0` turns the kernels off; `=1` makes a failed build an error instead of a warning.
`with native.disabled():` turns them off for a block of code (e.g. to compare both paths in one process);
`timm-layerattn kernels` builds them ahead of time and reports where they are.

The functions below are the typed entry points to the ops (keyword arguments named as in the op schemas).
"""
import contextlib
import contextvars
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._utils.env import cache_dir, env_switch

__all__ = [
    'NativeKernelError', 'available', 'build', 'disabled', 'last_error', 'mode', 'usable', 'transforms_active',
    'kcla_', 'mrla_base_', 'mrla_light_', 'mrla_light_tokens', 'mrla_base_tokens', 'trainable', 'norm_plane_affine',
    'channel_conv', 'channel_conv_backward',
    'plane_moments', 'tail_forward', 'tail_backward',
    'affine_residual_', 'kcla_train_values', 'kcla_train_backward', 'mrla_light_train_values',
    'mrla_light_train_backward', 'mrla_base_train_values', 'mrla_base_train_backward', 'dw_scale_add',
    'dw_scale_add_backward', 'norm_relu_forward', 'norm_relu_backward',
]

ENV = 'TIMM_LAYERATTN_NATIVE'
SOURCE = Path(__file__).with_name('csrc') / 'layer_attn_cpu.cpp'
# Every file of the library: the inference kernels (SOURCE), the training kernels, the token-grid inference kernels
# and their shared header.
SOURCES = (SOURCE, SOURCE.with_name('layer_attn_train_cpu.cpp'), SOURCE.with_name('layer_attn_tokens_cpu.cpp'))
HEADERS = (SOURCE.with_name('plane.h'),)
_LIB_NAME = 'layer_attn_cpu'

_loaded: Optional[bool] = None  # None: not tried yet in this process
_error: Optional[str] = None
_enabled = contextvars.ContextVar('timm_layerattn_native_enabled', default=True)
_load_lock = threading.Lock()


class NativeKernelError(RuntimeError):
    """The fused CPU kernels could not be built or loaded."""


def mode() -> str:
    """'off', 'on' (required) or 'auto' (default: use when the build works), from `TIMM_LAYERATTN_NATIVE`."""
    return env_switch(ENV)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the PyTorch path inside this block (this thread / task only)."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


def _compiler() -> Optional[str]:
    for candidate in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_signature() -> str:
    # -march=native code is only valid on CPUs with the same features: key the cache on them.
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        flags = ''
    return f'{platform.machine()} {flags.strip()}'


def _flags() -> List[str]:
    """Compiler flags (the C++ standard is added per attempt): against the installed torch, its C++ ABI and
    its OpenMP runtime (`at::parallel_for` runs on torch's intra-op threads)."""
    torch_dir = Path(torch.__file__).parent
    include = torch_dir / 'include'
    return [
        '-O3', '-march=native', '-fopenmp', '-fPIC', '-shared',
        f'-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}',
        f'-I{include}', f'-I{include / "torch" / "csrc" / "api" / "include"}',
        f'-L{torch_dir / "lib"}', '-lc10', '-ltorch_cpu',
    ]


def _library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256('\n'.join([
        *(f.read_text() for f in SOURCES + HEADERS), torch.__version__, str(torch.version.git_version), version,
        ' '.join(_flags()),
        _cpu_signature(),
    ]).encode()).hexdigest()[:16]
    return cache_dir() / 'kernels' / f'{_LIB_NAME}-{key}.so'


def build() -> Path:
    """Compile the kernels (or find them in the cache) and return the shared library's path.

    The library is written under a temporary name and renamed into place, so concurrent builds (e.g. one
    per DDP worker) never see a partial file.
    """
    cxx = _compiler()
    if cxx is None:
        raise NativeKernelError('no C++ compiler found (set CXX, or install g++ or clang++)')
    target = _library_path(cxx)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.tmp', dir=target.parent)
    os.close(fd)
    try:
        errors = []
        for std in ('c++20', 'c++17'):  # torch >= 2.10 headers need C++20; older compilers may lack it
            result = _compile_and_link(cxx, std, tmp)
            if result.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
                return target
            lines = result.stderr.strip().splitlines()
            detail = ' | '.join(([ln for ln in lines if 'error' in ln] or lines)[:3])
            errors.append(f'-std={std}: {detail or f"exit status {result.returncode}, no output"}')
        names = ', '.join(f.name for f in SOURCES)
        raise NativeKernelError(f'compiling {names} with {cxx} failed ({"; ".join(errors)})')
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile_and_link(cxx: str, std: str, out: str) -> subprocess.CompletedProcess:
    """Compile every source to an object file in parallel, then link them into `out`; the first failure's
    result (or the link's) is returned."""
    flags = [f'-std={std}', *_flags()]
    with tempfile.TemporaryDirectory(prefix='.objs-', dir=os.path.dirname(out)) as objs:
        jobs = []
        for src in SOURCES:
            obj = os.path.join(objs, src.stem + '.o')
            cmd = [cxx, '-c', str(src), '-o', obj, *flags]
            jobs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        failed = None
        for cmd, _, proc in jobs:
            stdout, stderr = proc.communicate(timeout=600)
            if proc.returncode and failed is None:
                failed = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        if failed is not None:
            return failed
        cmd = [cxx, *(obj for _, obj, _ in jobs), '-o', out, *flags]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _load() -> None:
    path = build()
    try:
        torch.ops.load_library(str(path))
    except OSError:  # an unreadable cached library (e.g. damaged on disk): build it afresh once
        path.unlink(missing_ok=True)
        torch.ops.load_library(str(build()))


def available() -> bool:
    """Whether the kernels are loaded in this process (building / loading them on the first call)."""
    if _loaded is None and mode() != 'off':
        with _load_lock:
            if _loaded is None:
                _try_load()
    return bool(_loaded) and mode() != 'off'


def _try_load() -> None:
    global _loaded, _error
    try:
        _load()
        _loaded = True
    except (NativeKernelError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        _loaded, _error = False, f'{type(e).__name__}: {e}'
        if mode() == 'on':
            raise NativeKernelError(f'{ENV}=1 but the fused CPU kernels are unavailable: {_error}') from e
        warnings.warn(
            f'timm_layerattn: the fused CPU kernels are unavailable ({_error}); the layer-attention '
            f'branches use plain PyTorch ops on CPU (same results, slower). Set {ENV}=0 to silence this.',
            RuntimeWarning, stacklevel=4)


def last_error() -> Optional[str]:
    """Why the kernels are unavailable, after `available()` returned False (None if they were not tried)."""
    return _error


def transforms_active() -> bool:
    """True under a `torch.func` transform (`grad`, `vmap`, `jacrev`, `jvp`, ...) or in forward-mode AD
    (`torch.autograd.forward_ad.dual_level`). Tensors there are wrapped, and neither the fused ops nor the
    memory-lean autograd Functions have rules for them (batching, forward derivative): PyTorch ops, which
    have, compute the same function."""
    functorch = getattr(torch._C, '_are_functorch_transforms_active', None)  # private, so looked up defensively
    if functorch is not None and functorch():
        return True
    return getattr(torch.autograd.forward_ad, '_current_level', -1) >= 0


def usable(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels can compute a branch on these tensors right now.

    Eager mode only (TorchScript, tracing by torch.jit / torch.fx, torch.compile, `torch.func` transforms and
    dispatch modes such as FLOP counters see the PyTorch ops), autograd off, float32 CPU tensors in contiguous
    NCHW.
    """
    if torch.is_grad_enabled() or not _enabled.get() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if transforms_active():
        return False
    if torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None:  # e.g. FlopCounterMode, FakeTensorMode: let them see aten ops
        return False
    for t in tensors:
        if isinstance(t, torch.fx.Proxy):  # torch.fx symbolic tracing
            return False
        if t.device.type != 'cpu' or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    return available()


# Typed entry points to the ops. Each computes one block's attention branch in eval mode, with the branch
# BatchNorm folded into the per-channel `norm_scale` / `norm_shift` by the caller, and updates the block
# output `x` in place (trailing underscore, as for PyTorch's in-place ops). Keyword names are the op
# schema's, and are passed to the op by name, so a mismatch with the C++ definition fails loudly.
def mrla_light_(
        x: Tensor,
        *,
        shortcut: Tensor,
        v_weight: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        lambda_t: Tensor,
        norm_scale: Tensor,
        norm_shift: Tensor,
        head_dim: int,
        attn_scale: float,
) -> Tensor:
    """MRLA-light: `x += (gate * norm_scale) * DW3(x) + (lambda_t * norm_scale) * shortcut + norm_shift`.

    `gate[b, h] = sigmoid(<Q_h, K_h> * attn_scale)`, with `Q`, `K` the ECA convs (`q_weight`, `k_weight`,
    `[1, 1, k]`) of the pooled `x`; `v_weight` `[C, 1, 3, 3]` is the depth-wise value conv. Returns `x`.
    """
    return torch.ops.timm_layerattn.mrla_light_(
        x, shortcut=shortcut, v_weight=v_weight, q_weight=q_weight, k_weight=k_weight, lambda_t=lambda_t,
        norm_scale=norm_scale, norm_shift=norm_shift, head_dim=head_dim, attn_scale=attn_scale)


def kcla_(
        x: Tensor,
        *,
        hist: Tensor,
        z: Optional[Tensor],
        v_weight: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        norm_d: Tensor,
        head_gate_weight: Tensor,
        norm_scale: Tensor,
        norm_shift: Tensor,
        head_dim: int,
        history_eps: float,
        max_log_weight: float,
        key_norm_eps: float,
) -> Tensor:
    """KCLA: `hist <- lerp(hist, x, alpha / (z + alpha + history_eps))` (in place), then
    `x += relu((gate * norm_scale) * DW3(hist) + norm_shift)`.

    `alpha[b, h] = exp(min(||K_h|| / norm_d[h], max_log_weight))` and
    `gate = sigmoid(head_gate_weight @ (<Q_h, K_h> / max(||K_h||, key_norm_eps)))`. `z` `[B, g]` is the
    incoming weight sum; None at the network's first block, where `hist` is only written (`z = hist = 0`).
    Returns the new weight sum `z + alpha`.
    """
    return torch.ops.timm_layerattn.kcla_(
        x, hist=hist, z=z, v_weight=v_weight, q_weight=q_weight, k_weight=k_weight, norm_d=norm_d,
        head_gate_weight=head_gate_weight, norm_scale=norm_scale, norm_shift=norm_shift, head_dim=head_dim,
        history_eps=history_eps, max_log_weight=max_log_weight, key_norm_eps=key_norm_eps)


def mrla_base_(
        x: Tensor,
        *,
        value: Tensor,
        values: List[Tensor],
        keys: Optional[Tensor],
        v_weight: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        norm_scale: Tensor,
        norm_shift: Tensor,
        head_dim: int,
        attn_scale: float,
) -> Tensor:
    """MRLA-base: `x += relu(norm_shift + sum_j (w_j * norm_scale) * V_j)` over the stage's values so far.

    `values` are the earlier blocks' value maps and `keys` (`[B, T - 1, C]`, None at a stage's first block)
    their keys; this block's value `DW3(x)` is written to `value`. `w` is the softmax over all `T` keys of
    `<Q_h, K_j,h> * attn_scale`. Returns the keys with this block's appended (`[B, T, C]`).
    """
    return torch.ops.timm_layerattn.mrla_base_(
        x, value=value, values=values, keys=keys, v_weight=v_weight, q_weight=q_weight, k_weight=k_weight,
        norm_scale=norm_scale, norm_shift=norm_shift, head_dim=head_dim, attn_scale=attn_scale)


# ---------------------------------------------------------------------------------------------------------------
# Training kernels, called by the autograd Functions of `lean`, `kcla` and `mrla` (see csrc/layer_attn_train_cpu.cpp
# for the maths of each). Unlike the inference ops they run inside autograd Functions, so the grad mode is not
# part of the rule; `trainable` is.
# ---------------------------------------------------------------------------------------------------------------


def mrla_light_tokens(
        x: Tensor,
        *,
        shortcut: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor,
        norm_eps: float,
        prev_weight: Tensor,
        prev_bias: Tensor,
        prev_eps: float,
        v_weight: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        lambda_t: Tensor,
        num_prefix: int,
        grid_h: int,
        grid_w: int,
        head_dim: int,
        attn_scale: float,
        prefix_norm: bool,
) -> Tensor:
    """MRLA-light on `[B, P + H*W, C]` tokens: `x + [LN(x)_prefix or 0 ; gate * GELU(DW3(LN(x)_grid)) +
    lambda_t * LN_prev(shortcut)_grid]` (a new tensor), with the gate from the ECA query / key of the pooled grid."""
    return torch.ops.timm_layerattn.mrla_light_tokens(
        x, shortcut=shortcut, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
        prev_weight=prev_weight, prev_bias=prev_bias, prev_eps=prev_eps, v_weight=v_weight, q_weight=q_weight,
        k_weight=k_weight, lambda_t=lambda_t, num_prefix=num_prefix, grid_h=grid_h, grid_w=grid_w,
        head_dim=head_dim, attn_scale=attn_scale, prefix_norm=prefix_norm)


def mrla_base_tokens(
        x: Tensor,
        *,
        values: List[Tensor],
        keys: Optional[Tensor],
        norm_weight: Tensor,
        norm_bias: Tensor,
        norm_eps: float,
        v_weight: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        num_prefix: int,
        grid_h: int,
        grid_w: int,
        head_dim: int,
        attn_scale: float,
        prefix_norm: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """MRLA-base on `[B, P + H*W, C]` tokens: returns `(out, value, keys')`, with `value = DW3(LN(x)_grid)`
    `[B, H, W, C]`, `keys'` the cache's keys plus this block's, and `out = x + [LN(x)_prefix or 0 ; sum_j w_j V_j]`
    over the earlier `values` (`[B, H, W, C]` each) and `value`."""
    return torch.ops.timm_layerattn.mrla_base_tokens(
        x, values=values, keys=keys, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
        v_weight=v_weight, q_weight=q_weight, k_weight=k_weight, num_prefix=num_prefix, grid_h=grid_h,
        grid_w=grid_w, head_dim=head_dim, attn_scale=attn_scale, prefix_norm=prefix_norm)


def token_dwconv(y: Tensor, v_weight: Tensor, *, num_prefix: int, grid_h: int, grid_w: int, gelu: bool) -> Tensor:
    """`[B, H*W, C]`: the depth-wise 3x3 conv of the patch grid of tokens `y` `[B, P + H*W, C]` (then GELU with
    `gelu`), in token order."""
    return torch.ops.timm_layerattn.token_dwconv(
        y, v_weight, num_prefix=num_prefix, grid_h=grid_h, grid_w=grid_w, gelu=gelu)


def token_dwconv_backward(
        grad: Tensor, y: Tensor, v_weight: Tensor, *, num_prefix: int, grid_h: int, grid_w: int, gelu: bool,
) -> Tuple[Tensor, Tensor]:
    """Gradients `(y, v_weight)` of `token_dwconv` for the output gradient `grad` `[B, H*W, C]`."""
    return torch.ops.timm_layerattn.token_dwconv_backward(
        grad, y, v_weight, num_prefix=num_prefix, grid_h=grid_h, grid_w=grid_w, gelu=gelu)


def token_cache_sum(weights: Tensor, values: List[Tensor]) -> Tensor:
    """`[B, H*W, C]`: `sum_j weights[:, j] * values[j]` with weights `[B, T, C]` and values `[B, H, W, C]`."""
    return torch.ops.timm_layerattn.token_cache_sum(weights, values)


def token_cache_sum_backward(grad: Tensor, weights: Tensor, values: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """Gradients `(weights, [values])` of `token_cache_sum` for the output gradient `grad` `[B, H*W, C]`."""
    return torch.ops.timm_layerattn.token_cache_sum_backward(grad, weights, values)


def trainable(*tensors: Optional[Tensor]) -> bool:
    """True when the fused training kernels can run on these tensors (None entries are skipped): kernels
    enabled and built, float32 CPU tensors in contiguous layout."""
    if not _enabled.get():
        return False
    for t in tensors:
        if t is not None and (t.device.type != 'cpu' or t.dtype != torch.float32 or not t.is_contiguous()):
            return False
    return available()


def norm_plane_affine(
        moments: Tensor, *, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
        running_var: Optional[Tensor], keep: Optional[Tensor], eps: float, factor: float, batch_stats: bool,
        update: bool, count: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A BatchNorm's `(mean, invstd)` `[C]` and per-plane `(scale, shift)` `[B, C]` with
    `norm(u) * keep == u * scale + shift`: batch statistics from the plane `moments` of `u` (`count` values
    per channel), running statistics otherwise. With `update` the running statistics move by `factor` towards
    the batch ones (unbiased variance), in place, as `nn.BatchNorm2d` does."""
    return torch.ops.timm_layerattn.norm_plane_affine(
        moments, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var, keep=keep, eps=eps,
        factor=factor, batch_stats=batch_stats, update=update, count=count)


def channel_conv(pooled: Tensor, weight: Tensor) -> Tensor:
    """`[B, F, C]`: the ECA channel conv `F.conv1d(pooled.unsqueeze(1), weight, padding=(k - 1) // 2)` of pooled
    descriptors `[B, C]` with `F` filters `[F, 1, k]`."""
    return torch.ops.timm_layerattn.channel_conv(pooled, weight)


def channel_conv_backward(grad: Tensor, pooled: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients `(pooled, weight)` of `channel_conv` for the output gradient `grad` `[B, F, C]`."""
    return torch.ops.timm_layerattn.channel_conv_backward(grad, pooled, weight)


def plane_moments(x: Tensor) -> Tensor:
    """`[2, B, C]` float64: the sum and the sum of squares of every (sample, channel) plane of `x`."""
    return torch.ops.timm_layerattn.plane_moments(x)


def tail_forward(pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """`x = relu(pre * scale + shift + shortcut)` (per-plane `scale`, `shift` `[B, C]`) and its plane means."""
    return torch.ops.timm_layerattn.tail_forward(pre, shortcut, scale, shift)


def tail_backward(
        pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor, *, grad_x: Optional[Tensor],
        grad_pooled: Optional[Tensor], mean: Tensor, invstd: Tensor, norm_weight: Tensor, keep: Optional[Tensor],
        batch_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients `(pre, shortcut, norm weight, norm bias)` of the tail `relu(norm(pre) * keep + shortcut)`."""
    return torch.ops.timm_layerattn.tail_backward(
        pre, shortcut, scale, shift, grad_x=grad_x, grad_pooled=grad_pooled, mean=mean, invstd=invstd,
        norm_weight=norm_weight, keep=keep, batch_stats=batch_stats)


def tail_grad_sums(
        pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor, *, grad_x: Optional[Tensor],
        grad_pooled: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The tail's first backward pass: `g = (grad_x + grad_pooled / HW) * [x > 0]` (the shortcut's gradient) and
    the per-plane sums `[2, B, C]` (float64) of `g` and of `g * pre`."""
    return torch.ops.timm_layerattn.tail_grad_sums(
        pre, shortcut, scale, shift, grad_x=grad_x, grad_pooled=grad_pooled)


def norm_backward_planes(
        g: Tensor, u: Tensor, *, sums: Tensor, gain: Tensor, offset: Optional[Tensor], mean: Tensor, invstd: Tensor,
        norm_weight: Tensor, batch_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients `(u, norm weight, norm bias)` of a BatchNorm whose output gradient is `g * gain + offset`
    (per-plane `gain`, `offset` `[B, C]`), given the per-plane sums `[2, B, C]` (float64) of that gradient and of
    it times `u`."""
    return torch.ops.timm_layerattn.norm_backward_planes(
        g, u, sums=sums, gain=gain, offset=offset, mean=mean, invstd=invstd, norm_weight=norm_weight,
        batch_stats=batch_stats)


def norm_relu_forward(u: Tensor, *, scale: Tensor, shift: Tensor) -> Tensor:
    """`relu(u * scale + shift)` with per-plane `scale`, `shift` `[B, C]` (a BatchNorm's affine map of `u`)."""
    return torch.ops.timm_layerattn.norm_relu_forward(u, scale=scale, shift=shift)


def norm_relu_backward(
        u: Tensor, *, scale: Tensor, shift: Tensor, grad_y: Tensor, mean: Tensor, invstd: Tensor,
        norm_weight: Tensor, batch_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients `(u, norm weight, norm bias)` of `relu(norm(u))` for the output gradient `grad_y`."""
    return torch.ops.timm_layerattn.norm_relu_backward(
        u, scale=scale, shift=shift, grad_y=grad_y, mean=mean, invstd=invstd, norm_weight=norm_weight,
        batch_stats=batch_stats)


def affine_residual_(out: Tensor, *, x: Tensor, a: Tensor, b: Tensor, relu: bool) -> Tensor:
    """`out <- x + act(out * a + b)` in place, per-plane `a`, `b` `[B, C]`, act ReLU or identity."""
    return torch.ops.timm_layerattn.affine_residual_(out, x=x, a=a, b=b, relu=relu)


def kcla_train_values(
        x: Tensor, *, hist: Optional[Tensor], weight: Tensor, gate: Tensor, v_weight: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """`(u, A', moments of u)` with `A' = lerp(hist, x, weight)` (`weight * x` without `hist`), `u = gate * DW3(A')`."""
    return torch.ops.timm_layerattn.kcla_train_values(x, hist=hist, weight=weight, gate=gate, v_weight=v_weight)


def kcla_train_backward(
        pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor, *, hist: Optional[Tensor], weight: Tensor,
        gate: Tensor, v_weight: Tensor, a: Tensor, b: Tensor, keep: Optional[Tensor], mean: Tensor, invstd: Tensor,
        norm_weight: Tensor, batch_stats: bool, grad_out: Tensor, grad_hist: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients `(x, hist, weight, gate, v_weight, norm weight, norm bias)` of one KCLA step."""
    return torch.ops.timm_layerattn.kcla_train_backward(
        pre, shortcut, scale, shift, hist=hist, weight=weight, gate=gate, v_weight=v_weight, a=a, b=b, keep=keep,
        mean=mean, invstd=invstd, norm_weight=norm_weight, batch_stats=batch_stats, grad_out=grad_out,
        grad_hist=grad_hist)


def mrla_light_train_values(
        x: Tensor, *, shortcut: Tensor, gate: Tensor, v_weight: Tensor, lambda_t: Tensor,
) -> Tuple[Tensor, Tensor]:
    """`(u, moments of u)` with `u = gate * DW3(x) + lambda_t * shortcut`."""
    return torch.ops.timm_layerattn.mrla_light_train_values(
        x, shortcut=shortcut, gate=gate, v_weight=v_weight, lambda_t=lambda_t)


def mrla_light_train_backward(
        pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor, *, gate: Tensor, v_weight: Tensor,
        lambda_t: Tensor, keep: Optional[Tensor], mean: Tensor, invstd: Tensor, norm_weight: Tensor,
        batch_stats: bool, grad_out: Tensor, lambda_input: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients `(x, r, gate, v_weight, lambda_t, norm weight, norm bias)` of one MRLA-light step, `r` the map
    `lambda_t` scales: `lambda_input` where given (DLA-light's refreshed shortcut), else the tail's `shortcut`."""
    return torch.ops.timm_layerattn.mrla_light_train_backward(
        pre, shortcut, scale, shift, gate=gate, v_weight=v_weight, lambda_t=lambda_t, keep=keep, mean=mean,
        invstd=invstd, norm_weight=norm_weight, batch_stats=batch_stats, grad_out=grad_out,
        lambda_input=lambda_input)


def dw_scale_add(r: Tensor, *, m: Tensor, w: Tensor) -> Tensor:
    """`DW3(r) + m * r` with a per-plane `m` `[B, C]` and depth-wise 3x3 weight `w` `[C, 1, 3, 3]`."""
    return torch.ops.timm_layerattn.dw_scale_add(r, m=m, w=w)


def dw_scale_add_backward(grad: Tensor, r: Tensor, *, m: Tensor, w: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients `(r, m, w)` of `dw_scale_add` for the output gradient `grad`."""
    return torch.ops.timm_layerattn.dw_scale_add_backward(grad, r, m=m, w=w)


def mrla_base_train_values(
        x: Tensor, *, values: List[Tensor], weights: Tensor, v_weight: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """`(S, V_t, moments of S)` with `V_t = DW3(x)` and `S = sum_j weights_j V_j` over `values + [V_t]`."""
    return torch.ops.timm_layerattn.mrla_base_train_values(x, values=values, weights=weights, v_weight=v_weight)


def mrla_base_train_backward(
        pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor, *, values: List[Tensor], weights: Tensor,
        v_weight: Tensor, a: Tensor, b: Tensor, keep: Optional[Tensor], mean: Tensor, invstd: Tensor,
        norm_weight: Tensor, batch_stats: bool, grad_out: Tensor, grad_value: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    """Gradients `(x, weights, v_weight, norm weight, norm bias, [values])` of one MRLA-base step."""
    return torch.ops.timm_layerattn.mrla_base_train_backward(
        pre, shortcut, scale, shift, values=values, weights=weights, v_weight=v_weight, a=a, b=b, keep=keep,
        mean=mean, invstd=invstd, norm_weight=norm_weight, batch_stats=batch_stats, grad_out=grad_out,
        grad_value=grad_value)
