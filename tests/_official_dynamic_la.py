"""Dynamic layer attention (DLA) for the tests: the official checkpoints' layouts and the official forward.

Written from reading the official code (bgx666/KCLA and tunantu/Dynamic-Layer-Attention
`cifar/models/cifar/dla_{l,b}.py`, tunantu's `imagenet/models/resnet_dla_l.py`), independently of the package's
renaming rules and modules (docs/design/dynamic_layer_attention.md#dyn-conversion, #dyn-forward):

* `official_shapes(variant, form, depth)`: key -> shape of an official `state_dict()` (`materialize` in
  tests/_official.py gives it values). Pinned to the real layouts by the parameter counts measured with the
  official code (tests/test_dynamic_la.py).
* `official_forward(sd, variant, form, x)`: the official network's eval forward on those tensors, as the
  official code computes it: the DSU as an explicit cell, the gate step reading either each sample's state or
  (`batch_coupled=True`, what the official code does) the batch's first sample's, DLA-base's re-weighted keys
  and values materialised block by block.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from _official import bn_shapes, eca_k
from _reference import bn_state, depthwise3x3, eca

Shapes = Dict[str, Tuple[int, ...]]


def _geometry(variant: str, depth: int):
    if variant == 'imagenet':
        return {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth], (64, 128, 256, 512), 64
    n = (depth - 2) // 9
    return (n, n, n), (16, 32, 64), 16


def _stage(variant: str, s: int) -> str:
    return f'layer{s + 1}.' if variant == 'imagenet' else f'stages.{s}.'


def official_shapes(variant: str, form: str, depth: int, num_classes: Optional[int] = None,
                    kcla_repo: bool = True) -> Shapes:
    """Key -> shape of an official DLA checkpoint.

    Args:
        variant: 'cifar' (Bottleneck, 9n+2) or 'imagenet' (ResNet-50 / 101, DLA-light only).
        form: 'light' or 'base'.
        kcla_repo: CIFAR DLA-light of bgx666/KCLA, which saves an unused top-level `bn2` (256); tunantu's copy has
            none.
    """
    layers, planes, inplanes = _geometry(variant, depth)
    imagenet = variant == 'imagenet'
    reduction = 16 if imagenet else 4
    num_classes = num_classes or (1000 if imagenet else 10)
    s: Shapes = {'conv1.weight': (64, 3, 7, 7) if imagenet else (16, 3, 3, 3)}
    s.update(bn_shapes('bn1.', inplanes))
    if form == 'light' and not imagenet and kcla_repo:
        s.update(bn_shapes('bn2.', 256))
    for si, (p, n) in enumerate(zip(planes, layers)):
        c, st = 4 * p, _stage(variant, si)
        for i in range(n):
            b = f'{st}layers.{i}.'
            s[b + 'conv1.weight'] = (p, inplanes, 1, 1)
            s.update(bn_shapes(b + 'bn1.', p))
            s[b + 'conv2.weight'] = (p, p, 3, 3)
            s.update(bn_shapes(b + 'bn2.', p))
            s[b + 'conv3.weight'] = (c, p, 1, 1)
            s.update(bn_shapes(b + 'bn3.', c))
            if i == 0 and (si > 0 or inplanes != c):
                s[b + 'downsample.0.weight'] = (c, inplanes, 1, 1)
                s.update(bn_shapes(b + 'downsample.1.', c))
            inplanes = c
        k = eca_k(c)
        for i in range(n):
            a = f'{st}attention.{i}.'
            inner = a + ('layer_attention.mrla.' if imagenet else 'layer_attention.layer_attention.')
            if form == 'light':
                s[a + 'layer_attention.lambda_t'] = (c, 1, 1)
            s[inner + 'Wq.weight'] = (1, 1, k)
            s[inner + 'Wk.weight'] = (1, 1, k)
            s[inner + 'Wv.weight'] = (c, 1, 3, 3)
            s.update(bn_shapes(a + 'bn_layer_attention.', c))
        for cell in ('w_ih', 'w_hh'):
            d = f'{st}lstm.{cell}.0.seq.'
            s[d + '0.weight'], s[d + '0.bias'] = (c // reduction, c), (c // reduction,)
            s[d + '2.weight'], s[d + '2.bias'] = (3 * c, c // reduction), (3 * c,)
        if form == 'light':
            s[st + ('extict' if imagenet else 'excite') + '.weight'] = (c, 1, 3, 3)
    s['fc.weight'], s['fc.bias'] = (num_classes, inplanes), (num_classes,)
    return s


def dsu(sd: Dict[str, torch.Tensor], p: str, u: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """The official one-layer `DSU_block` cell under prefix `p` (`...lstm.`): returns `(h', c')`."""
    def seq(name, t):
        t = F.relu(F.linear(t, sd[f'{p}{name}.0.seq.0.weight'], sd[f'{p}{name}.0.seq.0.bias']))
        return F.linear(t, sd[f'{p}{name}.0.seq.2.weight'], sd[f'{p}{name}.0.seq.2.bias'])
    gates = seq('w_ih', u) + seq('w_hh', h)
    i, f, g = gates.chunk(3, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(c), c


def _gate(sd, p, u, h, c, batch_coupled: bool) -> torch.Tensor:
    """The gate step: a DSU step whose new state is discarded. The official code passes `(ht[-1], ct[-1])`, which
    the cell indexes with `[0]`: the first sample's state for every sample."""
    if batch_coupled:
        h, c = h[0], c[0]
    return dsu(sd, p, u, h, c)[0]


def official_forward(sd: Dict[str, torch.Tensor], variant: str, form: str, depth: int, x: torch.Tensor,
                     head_dim: Optional[int] = None, batch_coupled: bool = False) -> torch.Tensor:
    """Logits of the official DLA network for the official state dict `sd`, eval mode."""
    imagenet = variant == 'imagenet'
    layers, _, _ = _geometry(variant, depth)
    d = head_dim or (32 if imagenet else 16)
    if imagenet:
        x = F.max_pool2d(F.relu(bn_state(F.conv2d(x, sd['conv1.weight'], stride=2, padding=3), sd, 'bn1.')), 3, 2, 1)
    else:
        x = F.relu(bn_state(F.conv2d(x, sd['conv1.weight'], padding=1), sd, 'bn1.'))
    for si, n in enumerate(layers):
        st = _stage(variant, si)
        keys: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        h = c = None
        for i in range(n):
            b, a = f'{st}layers.{i}.', f'{st}attention.{i}.'
            stride = 2 if si > 0 and i == 0 else 1
            out = F.relu(bn_state(F.conv2d(x, sd[b + 'conv1.weight']), sd, b + 'bn1.'))
            out = F.relu(bn_state(F.conv2d(out, sd[b + 'conv2.weight'], stride=stride, padding=1), sd, b + 'bn2.'))
            out = bn_state(F.conv2d(out, sd[b + 'conv3.weight']), sd, b + 'bn3.')
            r = x
            if b + 'downsample.0.weight' in sd:
                r = bn_state(F.conv2d(x, sd[b + 'downsample.0.weight'], stride=stride), sd, b + 'downsample.1.')
            x = F.relu(out + r)
            bsz, ch = x.shape[:2]
            g = ch // d
            if h is None:
                h = c = x.new_zeros(bsz, ch)
            h, c = dsu(sd, st + 'lstm.', x.mean((2, 3)), h, c)
            inner = a + ('layer_attention.mrla.' if imagenet else 'layer_attention.layer_attention.')
            pooled = x.mean((2, 3))
            q, k = eca(pooled, sd[inner + 'Wq.weight']), eca(pooled, sd[inner + 'Wk.weight'])
            v = depthwise3x3(x, sd[inner + 'Wv.weight'])
            if form == 'light':
                m = _gate(sd, st + 'lstm.', r.mean((2, 3)), h, c, batch_coupled)
                r = r * m[:, :, None, None] + depthwise3x3(r, sd[st + ('extict' if imagenet else 'excite') + '.weight'])
                attn = torch.sigmoid((q.view(bsz, g, d) * k.view(bsz, g, d)).sum(-1) / math.sqrt(d))
                o = attn.repeat_interleave(d, 1)[:, :, None, None] * v + sd[a + 'layer_attention.lambda_t'] * r
                x = x + bn_state(o, sd, a + 'bn_layer_attention.')
            else:
                for j in range(len(keys)):  # every cached entry re-weighted (the re-weighting compounds)
                    keys[j] = keys[j] * _gate(sd, st + 'lstm.', keys[j], h, c, batch_coupled)
                    values[j] = values[j] * _gate(sd, st + 'lstm.', values[j].mean((2, 3)), h, c,
                                                  batch_coupled)[:, :, None, None]
                keys.append(k)
                values.append(v)
                kk = torch.stack(keys, 1).view(bsz, len(keys), g, d)
                w = ((q.view(bsz, 1, g, d) * kk).sum(-1) / math.sqrt(d)).softmax(dim=1)  # [B, T, g]
                o = sum(w[:, j].repeat_interleave(d, 1)[:, :, None, None] * values[j] for j in range(len(values)))
                x = x + F.relu(bn_state(o, sd, a + 'bn_layer_attention.'))
    return F.linear(x.mean((2, 3)), sd['fc.weight'], sd['fc.bias'])
