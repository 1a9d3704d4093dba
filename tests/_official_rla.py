"""RLA-Net's official layout and forward, for the tests (docs/design/rla.md#rla-conversion, #rla-maths).

Written from the official code (joyfang1106/RLANet, `models/resnet_rla.py`), independently of the package's
renaming rules and modules:

* `official_shapes(depth, rla_chs, num_classes)`: key -> shape of `RLA_ResNet(RLA_Bottleneck, ...)
  .state_dict()`, in its order (stem, `conv_outs`, `recurrent_convs`, `stages`, `stage_bns`, `bn2`, `fc`);
* `official_state_dict(...)`: seeded random values for that layout (BN statistics and affines away from their
  init, so every norm matters);
* `training_checkpoint(sd)`: what the official `train.py` saves (`state_dict` under DistributedDataParallel's
  `module.` prefix, next to `epoch`, `arch`, `best_acc1`, `optimizer`): the layout of the published files;
* `official_forward(sd, x, training)`: the official forward as plain functions on the official key names,
  including its in-place aliasing (the stream reads the block *output*, see #rla-quirk-output).

The generator is pinned to the real layout by the parameter counts measured with the official code
(25,870,696 and 45,003,176), checked in tests/test_rla.py.
"""
from typing import Dict, List, Tuple, Union

import torch
import torch.nn.functional as F

Shapes = Dict[str, Tuple[int, ...]]
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
PLANES = (64, 128, 256, 512)
EXPANSION = 4
BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _bn(prefix: str, c: int) -> Shapes:
    return {prefix + f: (() if f == 'num_batches_tracked' else (c,)) for f in BN_FIELDS}


def official_shapes(depth: int = 50, rla_chs: int = 32, num_classes: int = 1000) -> Shapes:
    """Key -> shape of the official model's state dict (module registration order)."""
    layers = LAYERS[depth]
    out: Shapes = {'conv1.weight': (64, 3, 7, 7), **_bn('bn1.', 64)}
    out.update({f'conv_outs.{s}.weight': (rla_chs, p * EXPANSION, 1, 1) for s, p in enumerate(PLANES)})
    out.update({f'recurrent_convs.{s}.weight': (rla_chs, rla_chs, 3, 3) for s in range(4)})
    inplanes = 64
    for s, (p, n) in enumerate(zip(PLANES, layers)):
        for i in range(n):
            pre = f'stages.{s}.{i}.'
            out[pre + 'conv1.weight'] = (p, inplanes + rla_chs, 1, 1)
            out.update(_bn(pre + 'bn1.', p))
            out[pre + 'conv2.weight'] = (p, p, 3, 3)
            out.update(_bn(pre + 'bn2.', p))
            out[pre + 'conv3.weight'] = (p * EXPANSION, p, 1, 1)
            out.update(_bn(pre + 'bn3.', p * EXPANSION))
            if i == 0:
                out[pre + 'downsample.0.weight'] = (p * EXPANSION, inplanes, 1, 1)
                out.update(_bn(pre + 'downsample.1.', p * EXPANSION))
            inplanes = p * EXPANSION
    for s, n in enumerate(layers):
        for i in range(n):
            out.update(_bn(f'stage_bns.{s}.{i}.', rla_chs))
    out.update(_bn('bn2.', rla_chs))
    out['fc.weight'] = (num_classes, PLANES[-1] * EXPANSION + rla_chs)
    out['fc.bias'] = (num_classes,)
    return out


def num_params(shapes: Shapes) -> int:
    """Parameters (running statistics excluded)."""
    return sum(torch.Size(s).numel() for k, s in shapes.items()
               if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))


def official_state_dict(depth: int = 50, rla_chs: int = 32, num_classes: int = 1000,
                        seed: int = 0) -> Dict[str, torch.Tensor]:
    """Seeded values for `official_shapes`: He-scaled conv / linear weights, BN affines and statistics near 1 / 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in official_shapes(depth, rla_chs, num_classes).items():
        if k.endswith('num_batches_tracked'):
            out[k] = torch.tensor(100)
        elif k.endswith(('running_var', '.weight')) and len(shape) == 1:
            out[k] = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif len(shape) == 1:
            out[k] = torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = torch.Size(shape[1:]).numel()
            out[k] = torch.randn(shape, generator=g) * (2. / fan_in) ** 0.5
    return out


def training_checkpoint(sd: Dict[str, torch.Tensor], arch: str = 'rla_resnet50') -> Dict[str, object]:
    """The container the official `train.py` saves (`save_checkpoint`) around a DDP model's state dict."""
    return {
        'epoch': 120, 'arch': arch, 'best_acc1': torch.tensor(77.17),
        'state_dict': {'module.' + k: v for k, v in sd.items()},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'momentum': 0.9, 'weight_decay': 1e-4,
                                                     'nesterov': False, 'params': [0, 1, 2]}]},
    }


def _bn_apply(x: torch.Tensor, sd: Dict[str, torch.Tensor], prefix: str, training: bool) -> torch.Tensor:
    return F.batch_norm(x, sd[prefix + 'running_mean'].clone(), sd[prefix + 'running_var'].clone(),
                        sd[prefix + 'weight'], sd[prefix + 'bias'], training=training, momentum=0.1, eps=1e-5)


def official_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, training: bool = False,
                     stages: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Logits of the official `RLA_ResNet._forward_impl` on an official state dict; with `stages`, the four
    stage outputs instead (what the official MMDetection backbone returns)."""
    depth = 50 if 'stages.2.6.conv1.weight' not in sd else 101
    layers = LAYERS[depth]
    x = F.relu(_bn_apply(F.conv2d(x, sd['conv1.weight'], stride=2, padding=3), sd, 'bn1.', training))
    x = F.max_pool2d(x, 3, 2, 1)
    rla_chs = sd['recurrent_convs.0.weight'].shape[0]
    h = torch.zeros(x.shape[0], rla_chs, x.shape[2], x.shape[3])
    outs = []
    for s, n in enumerate(layers):
        for i in range(n):
            p = f'stages.{s}.{i}.'
            stride = 2 if (s > 0 and i == 0) else 1
            identity = x
            out = F.relu(_bn_apply(F.conv2d(torch.cat((x, h), 1), sd[p + 'conv1.weight']), sd, p + 'bn1.', training))
            out = F.relu(_bn_apply(F.conv2d(out, sd[p + 'conv2.weight'], stride=stride, padding=1), sd, p + 'bn2.',
                                   training))
            out = _bn_apply(F.conv2d(out, sd[p + 'conv3.weight']), sd, p + 'bn3.', training)
            if i == 0:
                identity = _bn_apply(F.conv2d(identity, sd[p + 'downsample.0.weight'], stride=stride), sd,
                                     p + 'downsample.1.', training)
            if stride != 1:
                h = F.avg_pool2d(h, 2, 2)
            # `y = out; out += identity; out = relu(out)` in place: y IS the block output
            x = F.relu(out + identity)
            y = x
            h = h + F.conv2d(y, sd[f'conv_outs.{s}.weight'])
            h = torch.tanh(_bn_apply(h, sd, f'stage_bns.{s}.{i}.', training))
            h = F.conv2d(h, sd[f'recurrent_convs.{s}.weight'], padding=1)
        outs.append(x)
    if stages:
        return outs
    h = F.relu(_bn_apply(h, sd, 'bn2.', training))
    x = torch.cat((x, h), 1).mean((2, 3))
    return F.linear(x, sd['fc.weight'], sd['fc.bias'])
