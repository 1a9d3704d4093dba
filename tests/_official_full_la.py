"""Official-layout checkpoints and an independent reference of the official forward, for full and linear layer
attention (docs/design/full_layer_attention.md).

Written from the official code (read, not copied), independently of the package's renaming rules and modules:

* `official_shapes_full_la(layout, depth)`: key -> shape of the KCLA repository's CIFAR `layer_attention` /
  `linear_attention` nets (`'cifar'`: the same keys as its MRLA-base CIFAR net) and of MRLA's `resnet_la_eq4`
  ResNet-50 (`'eq4'`), in the official `state_dict()` order;
* `official_full_la_forward(sd, layout, kind, x)`: eval logits of the official network on an official state dict,
  re-projecting the whole cache with each block's `Wk` / `Wv` as the official code does, with the official head
  split (`rearrange` in the CIFAR code, the flat `view` in the eq. 4 code) and the official block tail.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from _official import Shapes, bn_shapes, eca_k, official_shapes
from _reference import bn_state, depthwise3x3, eca

EQ4_LAYERS = (3, 4, 6, 3)


def official_shapes_full_la(layout: str, depth: int = 50, num_classes: int = 0) -> Shapes:
    """`layout`: 'cifar' (bottleneck, depth 9n+2, 10 classes by default) or 'eq4' (ResNet-50, 1000 classes)."""
    if layout == 'cifar':
        return official_shapes('cifar', 'mrla_base', depth, num_classes=num_classes or None)
    s: Shapes = {'conv1.weight': (64, 3, 7, 7), **bn_shapes('bn1.', 64)}
    inplanes = 64
    for si, (p, n) in enumerate(zip((64, 128, 256, 512), EQ4_LAYERS)):
        c = p * 4
        for i in range(n):
            pre = f'layer{si + 1}.{i}.'
            s[pre + 'conv1.weight'] = (p, inplanes, 1, 1)
            s.update(bn_shapes(pre + 'bn1.', p))
            s[pre + 'conv2.weight'] = (p, p, 3, 3)
            s.update(bn_shapes(pre + 'bn2.', p))
            s[pre + 'conv3.weight'] = (c, p, 1, 1)
            s.update(bn_shapes(pre + 'bn3.', c))
            if i == 0:
                s[pre + 'downsample.0.weight'] = (c, inplanes, 1, 1)
                s.update(bn_shapes(pre + 'downsample.1.', c))
            k = eca_k(c)
            s[pre + 'la.Wq.weight'] = (1, 1, k)
            s[pre + 'la.Wk.weight'] = (1, 1, k)
            s[pre + 'la.Wv.weight'] = (c, 1, 3, 3)
            s.update(bn_shapes(pre + 'bn_la.', c))
            inplanes = c
    s['fc.weight'] = (num_classes or 1000, inplanes)
    s['fc.bias'] = (num_classes or 1000,)
    return s


def _official_attention(x: torch.Tensor, cache: List[torch.Tensor], sd, wq: str, wk: str, wv: str, d: int,
                        kind: str, flat: bool) -> torch.Tensor:
    """The official layer-attention output for block output `x` over the raw cache (`x` last): each cached map is
    pooled and projected again with this block's `Wk`, convolved with its `Wv`."""
    b, c, h, w = x.shape
    t, g = len(cache), c // d
    ctx = torch.stack(cache, 1)  # [b, t, c, h, w]
    q = eca(x.mean((2, 3)), sd[wq])  # [b, c]
    k = eca(ctx.mean((3, 4)).reshape(b * t, c), sd[wk]).reshape(b, t, c)
    v = depthwise3x3(ctx.reshape(b * t, c, h, w), sd[wv]).reshape(b, t, c, h, w)
    if flat:  # the eq. 4 code: `K.view(b, heads, t, d)`, `V.view(b, heads, t, d, h, w)` on [b, t, c(, h, w)]
        k, v = k.reshape(b, g, t, d), v.reshape(b, g, t, d, h, w)
    else:  # `rearrange(..., 'b t (g d) ... -> b g t d ...')`
        k, v = k.view(b, t, g, d).transpose(1, 2), v.view(b, t, g, d, h, w).transpose(1, 2)
    q = q.view(b, g, 1, d)
    if kind == 'linear_la':  # elu + 1 features, context = sum_t phi(k_t)^T v_t, out = phi(q) context; no normaliser
        q, k = F.elu(q) + 1, F.elu(k) + 1
        context = torch.einsum('bgtd,bgte->bgde', k, v.reshape(b, g, t, -1))
        return torch.einsum('bgid,bgde->bgie', q, context).reshape(b, c, h, w)
    attn = (torch.einsum('bgid,bgtd->bgit', q, k) / math.sqrt(d)).softmax(-1)  # [b, g, 1, t]
    return torch.einsum('bgit,bgtdhw->bgidhw', attn, v).reshape(b, c, h, w)


def official_full_la_forward(sd: Dict[str, torch.Tensor], layout: str, kind: str, x: torch.Tensor,
                             depth: int = 50, flat: Optional[bool] = None) -> torch.Tensor:
    """Eval logits of the official network (`layout` 'cifar' with `kind` 'full_la' / 'linear_la', or 'eq4').
    `flat=False` gives the eq. 4 network with the paper's per-head split instead of the code's flat view."""
    eq4 = layout == 'eq4'
    flat = eq4 if flat is None else flat
    layers = EQ4_LAYERS if eq4 else ((depth - 2) // 9,) * 3
    d = 32 if eq4 else (16 if kind == 'full_la' else 8)
    if eq4:
        x = F.max_pool2d(F.relu(bn_state(F.conv2d(x, sd['conv1.weight'], stride=2, padding=3), sd, 'bn1.')), 3, 2, 1)
    else:
        x = F.relu(bn_state(F.conv2d(x, sd['conv1.weight'], padding=1), sd, 'bn1.'))
    for si, n in enumerate(layers):
        cache: List[torch.Tensor] = []  # reset at every stage (init_cell / a fresh `mem_x`)
        for i in range(n):
            stride = 2 if si > 0 and i == 0 else 1
            pre = f'layer{si + 1}.{i}.' if eq4 else f'stages.{si}.{i}.'
            out = F.relu(bn_state(F.conv2d(x, sd[pre + 'conv1.weight']), sd, pre + 'bn1.'))
            out = F.relu(bn_state(F.conv2d(out, sd[pre + 'conv2.weight'], stride=stride, padding=1), sd, pre + 'bn2.'))
            out = bn_state(F.conv2d(out, sd[pre + 'conv3.weight']), sd, pre + 'bn3.')
            shortcut = x
            if pre + 'downsample.0.weight' in sd:
                shortcut = bn_state(F.conv2d(x, sd[pre + 'downsample.0.weight'], stride=stride), sd,
                                    pre + 'downsample.1.')
            x = F.relu(out + shortcut)
            cache.append(x)
            if eq4:  # the attention output replaces the block output
                o = _official_attention(x, cache, sd, pre + 'la.Wq.weight', pre + 'la.Wk.weight',
                                        pre + 'la.Wv.weight', d, 'full_la', flat=flat)
                x = bn_state(o, sd, pre + 'bn_la.')
            else:
                o = _official_attention(x, cache, sd, pre + 'mrla.mrla.Wq.weight', pre + 'mrla.mrla.Wk.weight',
                                        pre + 'mrla.mrla.Wv.weight', d, kind, flat=False)
                o = bn_state(o, sd, pre + 'bn_mrla.')
                x = x + (F.relu(o) if kind == 'full_la' else o)
    return F.linear(x.mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


def flat_head_sources(t: int, channels: int, head_dim: int) -> List[List[Tuple[int, int]]]:
    """For each virtual head of the eq. 4 code's flat split, the (layer, original head) of the `t` chunks it
    reads: chunk `n = g * t + s` of the flattened `[t, C]` cache is head `n % G` of layer `n // G`."""
    g = channels // head_dim
    return [[divmod(gi * t + s, g) for s in range(t)] for gi in range(g)]
