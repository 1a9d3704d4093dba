"""The official EfficientNet-MRLA (joyfang1106/MRLA before commit 2915aff: `timm/models/efficientnet_mrla.py`,
`efficientnet_blocks.py`, `efficientnet_builder.py`, a timm 0.4.9 fork) as the tests need it: its state-dict
layout (`official_effnet_shapes`) and its eval-mode forward on that layout (`official_effnet_forward`).

Written from the official code, independently of the package and of timm's current builder: the EfficientNet
scaling rules (channel rounding, ceil depth scaling), the blocks (DepthwiseSeparable, InvertedResidual with SE
reduced from the block input) and the cell (`mrla_module`: `mla_layer` with 8 groups, `lambda_t`, `bn_mrla`,
added after the residual add of every InvertedResidual with a skip) are restated here. Elementary ops (eval
BatchNorm on a state dict, the ECA channel filter, the 3x3 depth-wise conv) are `_reference`'s.
"""
import math
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from _reference import bn_state, depthwise3x3, eca

Shapes = Dict[str, Tuple[int, ...]]

# (type, repeats, kernel, stride, expansion, out channels) of EfficientNet-B0, SE ratio 0.25 everywhere.
_B0 = [('ds', 1, 3, 1, 1, 16), ('ir', 2, 3, 2, 6, 24), ('ir', 2, 5, 2, 6, 40), ('ir', 3, 3, 2, 6, 80),
       ('ir', 3, 5, 1, 6, 112), ('ir', 4, 5, 2, 6, 192), ('ir', 1, 3, 1, 6, 320)]
# variant -> (channel multiplier, depth multiplier), as the official entrypoints pass them.
SCALING = {'b0': (1.0, 1.0), 'b1': (1.0, 1.1), 'b2': (1.1, 1.2)}
GROUPS = 8  # mrla_module(input_dim) -> mla_layer(groups=8)


class Block(NamedTuple):
    prefix: str
    kind: str
    in_chs: int
    mid_chs: int
    out_chs: int
    kernel: int
    stride: int
    se_chs: int
    skip: bool


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def eca_k(c: int) -> int:
    t = int(abs((math.log(c, 2) + 1) / 2.))
    return t if t % 2 else t + 1


def layout(variant: str) -> Tuple[int, List[Block], int]:
    """(stem width, blocks, head width) of the official `efficientnet_mrla_{variant}`."""
    cm, dm = SCALING[variant]
    width = (lambda c: make_divisible(c * cm)) if cm != 1.0 else (lambda c: make_divisible(c))
    stem = width(32)
    blocks, in_chs = [], stem
    for s, (kind, r, k, stride, e, c) in enumerate(_B0):
        out = width(c)
        for i in range(int(math.ceil(r * dm))):
            st = stride if i == 0 else 1
            mid = in_chs if kind == 'ds' else make_divisible(in_chs * e)
            se = make_divisible(in_chs * 0.25, divisor=1)
            blocks.append(Block(f'blocks.{s}.{i}.', kind, in_chs, mid, out, k, st, se, st == 1 and in_chs == out))
            in_chs = out
    return stem, blocks, width(1280)


def _bn(prefix: str, c: int) -> Shapes:
    return {prefix + n: (c,) for n in ('weight', 'bias', 'running_mean', 'running_var')} | \
        {prefix + 'num_batches_tracked': ()}


def official_effnet_shapes(variant: str, num_classes: int = 1000) -> Shapes:
    """Every tensor of the official model's state dict, official names, in module order."""
    stem, blocks, head = layout(variant)
    shapes: Shapes = {'conv_stem.weight': (stem, 3, 3, 3), **_bn('bn1.', stem)}
    for b in blocks:
        p = b.prefix
        se = {p + 'se.conv_reduce.weight': (b.se_chs, b.mid_chs, 1, 1), p + 'se.conv_reduce.bias': (b.se_chs,),
              p + 'se.conv_expand.weight': (b.mid_chs, b.se_chs, 1, 1), p + 'se.conv_expand.bias': (b.mid_chs,)}
        if b.kind == 'ds':
            shapes.update({p + 'conv_dw.weight': (b.in_chs, 1, b.kernel, b.kernel), **_bn(p + 'bn1.', b.in_chs), **se,
                           p + 'conv_pw.weight': (b.out_chs, b.in_chs, 1, 1), **_bn(p + 'bn2.', b.out_chs)})
            continue
        shapes.update({p + 'conv_pw.weight': (b.mid_chs, b.in_chs, 1, 1), **_bn(p + 'bn1.', b.mid_chs),
                       p + 'conv_dw.weight': (b.mid_chs, 1, b.kernel, b.kernel), **_bn(p + 'bn2.', b.mid_chs), **se,
                       p + 'conv_pwl.weight': (b.out_chs, b.mid_chs, 1, 1), **_bn(p + 'bn3.', b.out_chs)})
        if b.skip:
            k = eca_k(b.out_chs)
            shapes.update({p + 'mrla.lambda_t': (b.out_chs, 1, 1), p + 'mrla.mla.Wq.weight': (1, 1, k),
                           p + 'mrla.mla.Wk.weight': (1, 1, k), p + 'mrla.mla.Wv.weight': (b.out_chs, 1, 3, 3),
                           **_bn(p + 'bn_mrla.', b.out_chs)})
    shapes.update({'conv_head.weight': (head, blocks[-1].out_chs, 1, 1), **_bn('bn2.', head),
                   'classifier.weight': (num_classes, head), 'classifier.bias': (num_classes,)})
    return shapes


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _se(x: torch.Tensor, sd: Dict[str, torch.Tensor], p: str) -> torch.Tensor:
    s = x.mean((2, 3), keepdim=True)
    s = _swish(F.conv2d(s, sd[p + 'se.conv_reduce.weight'], sd[p + 'se.conv_reduce.bias']))
    return x * torch.sigmoid(F.conv2d(s, sd[p + 'se.conv_expand.weight'], sd[p + 'se.conv_expand.bias']))


def _dw(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    k = w.shape[-1]
    return F.conv2d(x, w, stride=stride, padding=((stride - 1) + (k - 1)) // 2, groups=x.shape[1])


def official_cell(x: torch.Tensor, shortcut: torch.Tensor, sd: Dict[str, torch.Tensor], p: str) -> torch.Tensor:
    """`x + bn_mrla(mrla(x, shortcut))`: `mla_layer` (8 groups, sigmoid of the scaled per-group Q.K) on the summed
    block output, plus `lambda_t * shortcut`."""
    b, c, h, w = x.shape
    d = c // GROUPS
    pooled = x.mean((2, 3))
    q = eca(pooled, sd[p + 'mrla.mla.Wq.weight']).view(b, GROUPS, 1, d)
    k = eca(pooled, sd[p + 'mrla.mla.Wk.weight']).view(b, GROUPS, 1, d)
    v = depthwise3x3(x, sd[p + 'mrla.mla.Wv.weight']).view(b, GROUPS, d, h, w)
    attn = torch.sigmoid((q @ k.transpose(-1, -2)) * (1 / math.sqrt(c / GROUPS))).view(b, GROUPS, 1, 1, 1)
    o = (v * attn).view(b, c, h, w) + sd[p + 'mrla.lambda_t'] * shortcut
    return x + bn_state(o, sd, p + 'bn_mrla.')


def official_effnet_forward(sd: Dict[str, torch.Tensor], variant: str, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of the official `efficientnet_mrla_{variant}` holding the tensors `sd`."""
    _, blocks, _ = layout(variant)
    x = _swish(bn_state(F.conv2d(x, sd['conv_stem.weight'], stride=2, padding=1), sd, 'bn1.'))
    for b in blocks:
        p, shortcut = b.prefix, x
        if b.kind == 'ds':
            x = _swish(bn_state(_dw(x, sd[p + 'conv_dw.weight'], b.stride), sd, p + 'bn1.'))
            x = bn_state(F.conv2d(_se(x, sd, p), sd[p + 'conv_pw.weight']), sd, p + 'bn2.')
        else:
            x = _swish(bn_state(F.conv2d(x, sd[p + 'conv_pw.weight']), sd, p + 'bn1.'))
            x = _swish(bn_state(_dw(x, sd[p + 'conv_dw.weight'], b.stride), sd, p + 'bn2.'))
            x = bn_state(F.conv2d(_se(x, sd, p), sd[p + 'conv_pwl.weight']), sd, p + 'bn3.')
        if b.skip:
            x = x + shortcut
            if b.kind == 'ir':
                x = official_cell(x, shortcut, sd, p)
    x = _swish(bn_state(F.conv2d(x, sd['conv_head.weight']), sd, 'bn2.'))
    return F.linear(x.mean((2, 3)), sd['classifier.weight'], sd['classifier.bias'])
