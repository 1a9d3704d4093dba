"""Straightforward reference implementations of the layer-attention formulas (spec layer_attention.md).

Written independently of the package code: per-head 5-D views like the official code, explicit
weighted sums over lists of earlier block outputs, BatchNorm and convs through `torch.nn.functional`.
Only the *parameters* are read from the package modules.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


def bn(x: torch.Tensor, norm: torch.nn.BatchNorm2d, training: bool) -> torch.Tensor:
    if training:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean = norm.running_mean.view(1, -1, 1, 1)
        var = norm.running_var.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def eca(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k-tap zero-padded filter along the channel axis of `p` `[B, C]`."""
    k = weight.shape[-1]
    return F.conv1d(p[:, None, :], weight, padding=(k - 1) // 2)[:, 0, :]


def depthwise3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, padding=1, groups=x.shape[1])


def heads(t: torch.Tensor, g: int) -> torch.Tensor:
    """`[B, C]` -> `[B, g, d]`."""
    return t.reshape(t.shape[0], g, -1)


class KCLAHistory:
    """KCLA history as an explicit list of (weight per head `[B, g]`, tensor `[B, C, H, W]`) tokens."""

    def __init__(self):
        self.tokens: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def normalised(self, eps: Optional[float], g: int) -> torch.Tensor:
        """sum_j w_j x_j / (sum_j w_j + eps), per head (eps None: no epsilon)."""
        num = 0.
        den = 0.
        for w, t in self.tokens:
            B, C, H, W = t.shape
            num = num + w.view(B, g, 1, 1, 1) * t.view(B, g, C // g, H, W)
            den = den + w.view(B, g, 1, 1, 1)
        out = num / (den + eps) if eps is not None else num / den
        return out.reshape(self.tokens[-1][1].shape)


def ref_kcla(cell, x: torch.Tensor, history: Optional[KCLAHistory], training: bool) -> Tuple[torch.Tensor, KCLAHistory]:
    """KCLA cell (spec §1.1-1.2) with the history kept as an explicit token list.

    `cell` provides the parameters: q, k, v, head_gate, norm, norm_d and (init cells) hist_proj,
    hist_k, hist_norm. `training` selects batch statistics in the BatchNorms; drop path must be 0.
    """
    B, C, H, W = x.shape
    g = cell.num_heads
    s_inv = cell.norm_d.view(1, g)
    if history is not None and cell.hist_norm is not None:
        prev_g = history.tokens[-1][1].shape[1] // (C // g)
        a = history.normalised(None, prev_g)  # U / Z, no epsilon
        if cell.hist_proj is not None:
            proj = cell.hist_proj
            a = F.conv2d(a, proj.weight, stride=proj.stride, groups=proj.groups)
        a = bn(a, cell.hist_norm, training)
        kappa = heads(eca(a.mean((2, 3)), cell.hist_k.weight), g)
        beta = torch.exp(torch.clamp(kappa.norm(dim=-1) / s_inv, max=10))
        history = KCLAHistory()
        history.tokens.append((beta, a))
    p = x.mean((2, 3))
    q = heads(eca(p, cell.q.weight), g)
    k = heads(eca(p, cell.k.weight), g)
    k_norm = k.norm(dim=-1)
    alpha = torch.exp(torch.clamp(k_norm / s_inv, max=10))
    history = history if history is not None else KCLAHistory()
    history.tokens.append((alpha, x))
    value = depthwise3x3(history.normalised(1e-3, g), cell.v.weight)
    score = (q * k).sum(-1) / k_norm
    gate = torch.sigmoid(score @ cell.head_gate.weight.t())  # [B, g]
    gated = (gate.view(B, g, 1, 1, 1) * value.view(B, g, C // g, H, W)).view(B, C, H, W)
    out = x + torch.relu(bn(gated, cell.norm, training))
    return out, history


def ref_mrla_light(mod, x: torch.Tensor, shortcut: torch.Tensor, training: bool) -> torch.Tensor:
    """MRLA-light (spec §2.1): x + BN(sigmoid(<Q_h, K_h> / sqrt(d)) V_h + lambda * shortcut)."""
    B, C, H, W = x.shape
    g = mod.num_heads
    p = x.mean((2, 3))
    q = heads(eca(p, mod.q.weight), g)
    k = heads(eca(p, mod.k.weight), g)
    a = torch.sigmoid((q * k).sum(-1) / math.sqrt(C // g))
    v = depthwise3x3(x, mod.v.weight).view(B, g, C // g, H, W)
    m = (a.view(B, g, 1, 1, 1) * v).view(B, C, H, W) + mod.lambda_t.view(1, C, 1, 1) * shortcut
    return x + bn(m, mod.norm, training)


def ref_mrla_base(mod, x: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor], training: bool):
    """MRLA-base (spec §3.1): softmax over the keys of the stage's blocks so far, weighted sum of values.

    `keys` / `values` are the lists of earlier blocks of the stage (empty at the stage's first block);
    this block's key / value are appended.
    """
    B, C, H, W = x.shape
    g = mod.num_heads
    d = C // g
    p = x.mean((2, 3))
    q = heads(eca(p, mod.q.weight), g)
    keys = keys + [heads(eca(p, mod.k.weight), g)]
    values = values + [depthwise3x3(x, mod.v.weight)]
    out = torch.zeros_like(x).view(B, g, d, H, W)
    logits = torch.stack([(q * kj).sum(-1) / math.sqrt(d) for kj in keys], dim=-1)  # [B, g, T]
    attn = torch.softmax(logits, dim=-1)
    for j, vj in enumerate(values):
        out = out + attn[:, :, j].view(B, g, 1, 1, 1) * vj.view(B, g, d, H, W)
    out = torch.relu(bn(out.view(B, C, H, W), mod.norm, training))
    return x + out, keys, values


def trunk_bottleneck(block, x: torch.Tensor, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain ResNet v1.5 bottleneck of `block`: returns (post-ReLU output, shortcut)."""
    shortcut = x
    if block.downsample is not None:
        conv, norm = block.downsample[0], block.downsample[1]
        shortcut = bn(F.conv2d(x, conv.weight, stride=conv.stride), norm, training)
    y = torch.relu(bn(F.conv2d(x, block.conv1.weight), block.bn1, training))
    c2 = block.conv2
    y = torch.relu(bn(F.conv2d(y, c2.weight, stride=c2.stride, padding=c2.padding, dilation=c2.dilation),
                      block.bn2, training))
    y = bn(F.conv2d(y, block.conv3.weight), block.bn3, training)
    return torch.relu(y + shortcut), shortcut


def ref_model_features(model, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """Whole-network reference forward of a bottleneck ResNetLA (stem, stages, attention wiring)."""
    if isinstance(model.conv1, torch.nn.Sequential):
        s = model.conv1
        y = torch.relu(bn(F.conv2d(x, s[0].weight, stride=2, padding=1), s[1], training))
        y = torch.relu(bn(F.conv2d(y, s[3].weight, padding=1), s[4], training))
        y = F.conv2d(y, s[6].weight, padding=1)
    else:
        c = model.conv1
        y = F.conv2d(x, c.weight, stride=c.stride, padding=c.padding)
    y = torch.relu(bn(y, model.bn1, training))
    if isinstance(model.maxpool, torch.nn.MaxPool2d):
        y = F.max_pool2d(y, 3, 2, 1)
    history = None
    for stage in model.stages():
        keys, values = [], []
        for block in stage:
            y, shortcut = trunk_bottleneck(block, y, training)
            attn = block.attn
            kind = type(attn).__name__
            if kind == 'KCLA':
                y, history = ref_kcla(attn, y, history, training)
            elif kind == 'MRLALight':
                y = ref_mrla_light(attn, y, shortcut, training)
            elif kind == 'MRLABase':
                y, keys, values = ref_mrla_base(attn, y, keys, values, training)
            else:
                assert attn is None, kind
    return y
