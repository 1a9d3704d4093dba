"""Official-layout checkpoints and an independent forward of the official SE / ECA / DIANet CIFAR baselines.

Written from the official code's description (docs/design/channel_gates.md; the `#cg-...` anchors are sections of
that page), independently of the package's modules and renaming rules (`timm_layerattn/layers/gates.py`,
`timm_layerattn/checkpoints/gates.py`), so a test that converts one of these checkpoints and compares logits checks
both.

* `official_gate_shapes(kind, depth)`: key -> shape of the official `state_dict()` (#cg-conversion), pinned to the
  real layouts by the parameter counts measured with the official code (#cg-param-counts).
* `official_gate_forward(sd, kind, depth, x)`: the official network's eval-mode forward on official key names
  (#cg-maths): torchvision bottlenecks, the gate between bn3 and the residual add (SE only below 256 channels,
  #cg-se-last-stage), DIANet's cell stepped once per block with `(h, c)` zero at each stage's start
  (#cg-dianet), `AvgPool2d(8)` and the classifier.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from _official import bn_shapes, eca_k

Shapes = Dict[str, Tuple[int, ...]]

# Parameter counts of the official builders (10 classes), measured with the official code (#cg-param-counts).
OFFICIAL_PARAMS = {
    'se': {20: 241_882, 56: 655_834, 110: 1_276_762},
    'eca': {20: 220_404, 56: 591_400, 110: 1_147_894},
    'dianet': {20: 439_226, 56: 810_170, 110: 1_366_586},
}
PLANES = (16, 32, 64)
SE_SKIP = 256  # the official SE Bottleneck gates only branches narrower than this


def blocks(depth: int) -> int:
    return (depth - 2) // 9


def block_prefix(kind: str, stage: int, block: int) -> str:
    """Official prefix of block `block` of stage `stage` (both 0-based)."""
    return f'layer{stage + 1}.ModuleList.{block}.' if kind == 'dianet' else f'layer{stage + 1}.{block}.'


def cell_shapes(prefix: str, c: int) -> Shapes:
    """DIANet's cell of width `c`: two maps Linear c -> c/4 -> 4c (`w_ih`, `w_hh`), with biases."""
    s: Shapes = {}
    for name in ('w_ih', 'w_hh'):
        p = f'{prefix}lstm.{name}.0.seq.'
        s.update({p + '0.weight': (c // 4, c), p + '0.bias': (c // 4,), p + '2.weight': (4 * c, c // 4),
                  p + '2.bias': (4 * c,)})
    return s


def official_gate_shapes(kind: str, depth: int, num_classes: int = 10) -> Shapes:
    """Key -> shape of an official checkpoint of `kind` ('se', 'eca', 'dianet'), in `state_dict()` order."""
    s: Shapes = {'conv1.weight': (16, 3, 3, 3)}
    s.update(bn_shapes('bn1.', 16))
    inplanes = 16
    for si, p in enumerate(PLANES):
        c = 4 * p
        for i in range(blocks(depth)):
            t = block_prefix(kind, si, i)
            s[t + 'conv1.weight'] = (p, inplanes, 1, 1)
            s.update(bn_shapes(t + 'bn1.', p))
            s[t + 'conv2.weight'] = (p, p, 3, 3)
            s.update(bn_shapes(t + 'bn2.', p))
            s[t + 'conv3.weight'] = (c, p, 1, 1)
            s.update(bn_shapes(t + 'bn3.', c))
            if i == 0:
                s[t + 'downsample.0.weight'] = (c, inplanes, 1, 1)
                s.update(bn_shapes(t + 'downsample.1.', c))
            if kind == 'se':  # built in every block, run only below 256 channels
                s[t + 'se.fc.0.weight'] = (c // 16, c)
                s[t + 'se.fc.2.weight'] = (c, c // 16)
            elif kind == 'eca':
                s[t + 'eca.conv.weight'] = (1, 1, eca_k(c))
            inplanes = c
        if kind == 'dianet':
            s.update(cell_shapes(f'layer{si + 1}.', 4 * p))
    s['fc.weight'] = (num_classes, inplanes)
    s['fc.bias'] = (num_classes,)
    return s


def never_run_se_keys(depth: int) -> List[str]:
    """The official SE keys of blocks of 256 channels or more (built, never run)."""
    return [k for k, shape in official_gate_shapes('se', depth).items()
            if '.se.fc.' in k and max(shape) >= SE_SKIP]


def _bn(sd: Dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, sd[prefix + 'running_mean'], sd[prefix + 'running_var'], sd[prefix + 'weight'],
                        sd[prefix + 'bias'], False, 0., 1e-5)


def _lstm_step(sd: Dict[str, torch.Tensor], prefix: str, seq: torch.Tensor, h: torch.Tensor, c: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official cell: gates = map_ih(seq) + map_hh(h); i, f, g, o = chunks; c' = f c + i g; h' = o sigmoid(c')."""
    def small(name: str, v: torch.Tensor) -> torch.Tensor:
        p = f'{prefix}lstm.{name}.0.seq.'
        v = torch.relu(v @ sd[p + '0.weight'].t() + sd[p + '0.bias'])
        return v @ sd[p + '2.weight'].t() + sd[p + '2.bias']

    gates = small('w_ih', seq) + small('w_hh', h)
    d = h.shape[1]
    i, f, g, o = (gates[:, j * d:(j + 1) * d] for j in range(4))
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.sigmoid(c), c


def official_gate_forward(sd: Dict[str, torch.Tensor], kind: str, depth: int, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of the official `kind` network with the official tensors `sd` (32 px input)."""
    x = torch.relu(_bn(sd, 'bn1.', F.conv2d(x, sd['conv1.weight'], padding=1)))
    for si, p in enumerate(PLANES):
        c_out = 4 * p
        h = c = torch.zeros(x.shape[0], c_out)
        for i in range(blocks(depth)):
            t = block_prefix(kind, si, i)
            stride = 2 if si > 0 and i == 0 else 1
            out = torch.relu(_bn(sd, t + 'bn1.', F.conv2d(x, sd[t + 'conv1.weight'])))
            out = torch.relu(_bn(sd, t + 'bn2.', F.conv2d(out, sd[t + 'conv2.weight'], stride=stride, padding=1)))
            out = _bn(sd, t + 'bn3.', F.conv2d(out, sd[t + 'conv3.weight']))
            shortcut = _bn(sd, t + 'downsample.1.', F.conv2d(x, sd[t + 'downsample.0.weight'], stride=stride)) \
                if i == 0 else x
            pooled = out.mean((2, 3))
            if kind == 'se' and c_out < SE_SKIP:
                gate = torch.sigmoid(torch.relu(pooled @ sd[t + 'se.fc.0.weight'].t()) @ sd[t + 'se.fc.2.weight'].t())
            elif kind == 'eca':
                w = sd[t + 'eca.conv.weight']
                gate = torch.sigmoid(F.conv1d(pooled[:, None, :], w, padding=(w.shape[-1] - 1) // 2)[:, 0])
            elif kind == 'dianet':
                h, c = _lstm_step(sd, f'layer{si + 1}.', pooled, h, c)
                gate = h
            else:
                gate = torch.ones_like(pooled)
            x = torch.relu(out * gate[:, :, None, None] + shortcut)
    x = F.avg_pool2d(x, 8).flatten(1)
    return x @ sd['fc.weight'].t() + sd['fc.bias']

