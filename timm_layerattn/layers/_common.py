"""Small helpers shared by the layer-attention modules."""
import math
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function

from . import lean, native
from ._checks import check_int, check_rate

__all__ = [
    'eca_kernel_size', 'accumulation_dtype', 'ChannelConv1d', 'DepthwiseConv3x3', 'depthwise_conv3x3',
    'depthwise_conv3x3_backward', 'per_channel',
    'LayerAttnBase',
]


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """Odd 1-D kernel size from the ECA rule, as used by every official KCLA / MRLA module.

    `math.log(channels, 2)` (not `log2`) keeps the official rounding for non-power-of-two widths.
    """
    t = int(abs((math.log(channels, 2) + beta) / gamma))
    return t if t % 2 else t + 1


@torch.fx.wrap  # an fx leaf: it branches on the dtype
@register_notrace_function
def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the per-channel attention maths and carried sums: float32 for half / bfloat16 / float32 inputs,
    float64 for float64.

    Dot products, key norms and softmax logits of pooled descriptors overflow float16 (65504) as soon as the
    pooled features reach a few hundred; at `[B, C]` size float32 costs nothing measurable.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ChannelConv1d(nn.Conv1d):
    """ECA-style k-tap filter sliding along the channel axis of a pooled `[B, C]` descriptor.

    Stores a `[1, 1, k]` weight exactly like the official `Conv1d(1, 1, k)` modules.
    """

    def __init__(self, channels: int, device=None, dtype=None):
        k = eca_kernel_size(channels)
        super().__init__(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x.unsqueeze(1), self.weight, self.bias).squeeze(1)


@register_notrace_function
def depthwise_conv3x3(
        x: torch.Tensor,
        weight: torch.Tensor,
        split_above: int = 1 << 20,
        chunk: int = 1 << 20,
) -> torch.Tensor:
    """3x3 depth-wise convolution, stride 1, zero padding 1, no bias.

    oneDNN runs an NCHW depth-wise conv by reordering input and output through blocked scratch buffers
    of the full tensor size. With glibc's default malloc, such buffers of several MB are often mapped afresh
    on every call, and the page faults then dominate: at ResNet-50 stage 1 (batch 4) the conv took 14.5 ms instead
    of 2.5 ms (measured on the project's 2-core machines). Convolving large CPU inputs in batch chunks
    keeps every buffer small (CPU inputs of more than `split_above` elements go in batch chunks of at most
    `chunk` elements); the result is identical.
    """
    channels = x.shape[1]
    if not torch.jit.is_scripting():
        exporting = getattr(torch.compiler, 'is_exporting', None)  # torch >= 2.6
        if exporting is not None and exporting():  # torch.export (ONNX): the chunks would be fixed at the traced shape
            return F.conv2d(x, weight, None, 1, 1, 1, channels)
    if x.device.type == 'cpu' and x.numel() > split_above and x.shape[0] > 1 and x.is_contiguous():
        per_chunk = max(1, chunk // (x.numel() // x.shape[0]))
        parts = [F.conv2d(part, weight, None, 1, 1, 1, channels) for part in x.split(per_chunk)]
        return torch.cat(parts)
    return F.conv2d(x, weight, None, 1, 1, 1, channels)


def depthwise_conv3x3_backward(
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        need_weight: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of `depthwise_conv3x3(x, weight)` for `x` and (when `need_weight`) the weight, given `grad`."""
    g_x, g_w = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], x.shape[1], [True, need_weight, False])[:2]
    return g_x, g_w


class DepthwiseConv3x3(nn.Conv2d):
    """The value projection `DW3`: depth-wise 3x3, no bias (official weight shape `[C, 1, 3, 3]`)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__(channels, channels, 3, padding=1, groups=channels, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv3x3(x, self.weight)


def per_channel(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Expand per-head values `[B, g]` (or `[B, T, g]`) to per-channel values along the last dim."""
    return t.repeat_interleave(head_dim, dim=-1)


def eca_channel_conv(pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ECA channel convs of pooled descriptors, `F.conv1d(pooled.unsqueeze(1), weight, padding=(k - 1) // 2)`
    (`[B, C]`, `[F, 1, k]` -> `[B, F, C]`). On float32 CPU tensors in eager mode it runs the fused kernel (with
    autograd, as `lean.ChannelConv` on the lean path): a oneDNN conv1d (and its backward) costs 0.1-0.7 ms on
    these `[B, 1, C]` inputs, the kernel a few microseconds."""
    if not torch.jit.is_scripting() and _fused_channel_conv(pooled, weight):
        return _channel_conv_kernel(pooled, weight)
    return F.conv1d(pooled.unsqueeze(1), weight, None, 1, (weight.shape[-1] - 1) // 2)


@torch.jit.unused
def _fused_channel_conv(pooled: torch.Tensor, weight: torch.Tensor) -> bool:
    return native.usable(pooled, weight) or (lean.active() and native.trainable(pooled, weight))


@torch.jit.unused
def _channel_conv_kernel(pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return native.channel_conv(pooled, weight) if not torch.is_grad_enabled() else lean.ChannelConv.apply(pooled, weight)


class LayerAttnBase(nn.Module):
    """Common parts of a per-block layer-attention module, and its one dispatch point.

    Every strategy builds a query and a key from the pooled block output with ECA-style channel convs
    (`q`, `k`), a value with a depth-wise 3x3 conv (`v`), normalises its branch (`norm`) and drops it
    with `drop_path`. `forward(x, shortcut, state) -> (out, state)` takes the block output `x` (after its
    final activation), the block's residual input `shortcut` and the carried per-network attention state (a
    list of tensors whose meaning belongs to the strategy).

    `forward` chooses, by one rule, between three implementations of the same function, which subclasses
    provide:

    * `forward_reference`: the definition, in plain ops, with `norm` and `drop_path` applied as modules. Used
      in training and whenever the norm cannot be folded; the reference the other two paths are held to.
    * `forward_folded`: eval mode. The BatchNorm is then a per-channel affine (`_fold_norm`), merged into the
      per-sample gates: fewer full-size passes, forward and backward. With autograd off
      (`torch.no_grad` / `torch.inference_mode`) the branch is also added in place to a buffer this forward
      owns. GPUs, TorchScript, `torch.compile` and `torch.export` run it in inference. Measured on CPU
      (ResNet-50 variants, batch 4, 224 px, kernels off), the branches take 26-37% less time than with
      `forward_reference` without autograd, and for MRLA 12-20% less forward + backward.
    * `forward_native`: what `forward_folded` computes with autograd off, in one fused CPU op per block
      (see `native`), whenever `native.usable` accepts the tensors the op reads (`_native_inputs`).

    `tests/test_layer_math.py::test_eval_paths_agree` and
    `tests/test_native_kernels.py::test_native_path_agrees_with_pytorch_paths` hold the paths equal up to
    rounding. Rounding is all that differs, but a deep net at random init amplifies it: in ResNet-101 MRLA-light
    one ulp changed in any single op (the fused kernel's, or a more exact pooling, gate or value conv in PyTorch)
    moves some logits by more than timm's fx tolerance (rtol 1e-4, atol 1e-5) for about half the seeds. So under
    fx tracing in eval mode the module records itself as one graph node (`_graph_node`): running the graph calls
    this `forward`, which dispatches as in eager, bit for bit (`tests/test_timm_contract.py::test_fx_every_model`).
    """

    def __init__(
            self,
            channels: int,
            head_dim: int,
            drop_path: float,
            norm_layer: Type[nn.Module],
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        owner = type(self).__name__
        check_int(owner, 'channels', channels)
        check_int(owner, 'head_dim', head_dim)
        check_rate(owner, 'drop_path', drop_path)
        if channels % head_dim:
            raise ValueError(
                f'{owner}: channels ({channels}) must be divisible by head_dim ({head_dim})')
        self.channels = channels
        self.head_dim = head_dim
        self.num_heads = channels // head_dim
        self.q = ChannelConv1d(channels, **dd)
        self.k = ChannelConv1d(channels, **dd)
        self.v = DepthwiseConv3x3(channels, **dd)
        self.norm = norm_layer(channels, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The branch added to the block output `x`, and the state for the next block.

        With autograd off, `x` and the incoming state may be updated in place: the caller must not reuse them.
        """
        if self._can_fold_norm():
            if not torch.jit.is_scripting():  # the fused ops are eager-only: scripting skips this branch
                if isinstance(x, torch.fx.Proxy):
                    return self._graph_node(x, shortcut, state)
                if native.usable(x, *self._native_inputs(shortcut, state)):
                    return self.forward_native(x, shortcut, state)
            return self.forward_folded(x, shortcut, state)
        return self.forward_reference(x, shortcut, state)

    def forward_reference(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The definition: plain ops, `norm` and `drop_path` as modules, any mode."""
        raise NotImplementedError

    def forward_folded(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval mode only (`_can_fold_norm()`): the norm folded into the gates, in place without autograd."""
        raise NotImplementedError

    @torch.jit.unused
    def forward_native(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval mode, autograd off, `native.usable` inputs only: the fused CPU op."""
        raise NotImplementedError

    @torch.jit.unused
    def _graph_node(
            self,
            x: torch.fx.Proxy,
            shortcut: torch.fx.Proxy,
            state: List[torch.fx.Proxy],
    ) -> Tuple[torch.fx.Proxy, List[torch.fx.Proxy]]:
        """Under fx tracing, eval mode: this module as one `call_module` node, whose `forward` runs at each call of
        the graph and takes the eager path (the fused kernels where `native.usable`). Unlike a leaf module
        (`register_notrace_module`) it unpacks its output here, the state's entries first and the new `x` last:
        `x` stays the last node of the block and of the stage, which timm's and torchvision's feature extractors
        return for a module name. A module traced as the root records its PyTorch ops."""
        tracer = x.tracer
        path = tracer.path_of_module(self)
        if not path:
            return self.forward_folded(x, shortcut, state)
        out = tracer.create_proxy('call_module', path, (x, shortcut, state), {})
        out_state = out[1]
        return_state = [out_state[i] for i in range(self._state_len(len(state)))]
        return out[0], return_state

    @torch.jit.unused
    def _state_len(self, incoming: int) -> int:
        """Length of the state `forward` returns for an incoming state of `incoming` tensors."""
        raise NotImplementedError

    @torch.jit.unused
    def tail_usable(self, pre: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]) -> bool:
        """Whether the block may hand this module its tail (`forward_tail`) now: autograd on, eager, a plain
        BatchNorm (a SyncBatchNorm, say, keeps the module path), tensors `lean.usable` accepts."""
        return type(self.norm) is nn.BatchNorm2d and lean.usable(pre, shortcut, *state)

    @torch.jit.unused
    def forward_tail(
            self,
            pre: torch.Tensor,
            norm: nn.BatchNorm2d,
            shortcut: torch.Tensor,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Training with autograd, memory-lean: the block's tail `x = relu(norm(pre) * keep + shortcut)` and this
        branch as autograd Functions that keep `pre`, `shortcut`, the carried state and per-channel vectors,
        and recompute the rest in backward (see `lean`). `keep` is the block's drop-path factor `[B]`.
        Equal to the tail followed by `forward_reference`."""
        tail = lean.block_tail(pre, norm, shortcut, keep)
        return self.forward_lean(tail, lean.drop_path_keep(self.drop_path, tail.x), state)

    @torch.jit.unused
    def forward_lean(
            self,
            tail: lean.Tail,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """This branch on the tail's output as the family's autograd Function; `keep` is the branch's drop-path
        factor `[B]` (None without drop path)."""
        raise NotImplementedError

    @torch.jit.unused
    def _native_inputs(self, shortcut: torch.Tensor, state: List[torch.Tensor]) -> List[torch.Tensor]:
        """The tensors besides `x` that the fused op reads; `native.usable` must accept all of them."""
        raise NotImplementedError

    def _query_key(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query and key `[B, C]` of the pooled descriptor: one 2-filter conv over `q` and `k` weights.

        Returned in `accumulation_dtype` (float32 under float16 / bfloat16 and autocast), so that the scores built
        from them cannot overflow; callers cast the resulting gates back to the feature dtype.
        """
        qk = eca_channel_conv(pooled, torch.cat([self.q.weight, self.k.weight])).to(accumulation_dtype(pooled))
        return qk[:, 0], qk[:, 1]

    def _can_fold_norm(self) -> bool:
        """True when the branch is deterministic and its norm uses running statistics."""
        norm = self.norm
        return not self.training and not norm.training and norm.running_var is not None

    def _fold_norm(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel `(scale, shift)` of the eval-mode BatchNorm, shapes `[C]`."""
        norm = self.norm
        mean, var = norm.running_mean, norm.running_var
        assert mean is not None and var is not None
        scale = torch.rsqrt(var + norm.eps)
        weight, bias = norm.weight, norm.bias
        if weight is not None:
            scale = scale * weight
        if bias is not None:
            return scale, torch.addcmul(bias, mean, scale, value=-1.)
        return scale, -mean * scale
