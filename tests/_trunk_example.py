"""The worked example of docs/add_a_trunk.md as a module: a new trunk (a plain, VGG-style conv net) that hosts an
existing strategy (KCLA's `BlockAttention`) unchanged, through the core's unit contract and strategy sites.

`tests/test_worked_examples.py` imports it in a fresh interpreter and runs the `check_*` functions.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from timm_layerattn.core import BlockSite, LAStage, LayerStrategy, Shared, State
from timm_layerattn.families import Family, imagenet_cfg, register_family
from timm_layerattn.layers import LayerAttnCfg
from timm_layerattn.models._builder import build_model, register_trunk
from timm_layerattn.models.resnet_la import BlockAttention


# 1. The architecture config: what the trunk is, plus the `TrunkCfg` protocol strategies read.
@dataclass(frozen=True)
class PlainNetCfg:
    widths: Tuple[int, ...] = (32, 64, 128)
    depth: int = 2  # conv units per stage; each stage's first strides by 2
    strategy: Optional[LayerStrategy] = None
    name: str = ''

    def block_widths(self) -> Tuple[int, ...]:
        return self.widths

    def block_inputs(self) -> List[int]:
        ins = [self.widths[0]]
        for width in self.widths:
            ins += [width] * self.depth
        return ins[:-1]

    @property
    def num_feature_levels(self) -> int:
        return len(self.widths) + 1


# 2. A unit: `(x, state, shared) -> (x, state)`, with the strategy's module at its attention site.
class PlainUnit(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, attn: Optional[nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.attn = attn

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        shortcut = x
        x = torch.relu(self.bn(self.conv(x)))
        if self.attn is not None:
            x, state = self.attn(x, shortcut, state)
        return x, state


# 3. The network: stages of units (`LAStage` runs and checkpoints them with the carried state).
class PlainNet(nn.Module):
    def __init__(self, cfg: PlainNetCfg, num_classes: int = 1000, in_chans: int = 3, global_pool: str = 'avg',
                 drop_rate: float = 0., drop_path_rate: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        strategy = cfg.strategy or LayerStrategy()
        strategy.check(cfg, cfg.name or 'PlainNet')
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, cfg.widths[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(cfg.widths[0]), nn.ReLU())
        self.feature_info = [dict(num_chs=cfg.widths[0], reduction=2, module='stem')]
        stages, in_chs, block_id, prev = [], cfg.widths[0], 0, None
        num_blocks = cfg.depth * len(cfg.widths)
        for s, width in enumerate(cfg.widths):
            units = []
            for i in range(cfg.depth):
                stride = 2 if i == 0 else 1
                site = BlockSite(s, i, block_id, num_blocks, in_chs, width, prev.out_chs if prev else None, stride,
                                 prev)
                units.append(PlainUnit(in_chs, width, stride, strategy.block_attn(site, 0., nn.BatchNorm2d, {})))
                in_chs, prev, block_id = width, site, block_id + 1
            stages.append(LAStage(*units))
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (s + 2), module=f'stages.{s}'))
        self.stages_ = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        strategy.init_weights(self)

    def stages(self) -> List[LAStage]:  # the `Trunk` protocol
        return list(self.stages_)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages_:
            stage.grad_checkpointing = enable

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        take, _ = feature_take_indices(len(self.feature_info), indices)
        x = self.stem(x)
        feats, state = [x], []
        for stage in self.stages_:
            x, state = stage(x, state, [])
            feats.append(x)
        out = [feats[i] for i in take]
        return out if intermediates_only else (x, out)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages_ = self.stages_[:max_index]
        if prune_head:
            self.global_pool, self.fc = create_classifier(self.num_features, 0, pool_type='')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# 4. Register the trunk, then models exactly as a family module does.
register_trunk(PlainNetCfg, PlainNet)

model_cfgs = dict(plainnet6_kcla=PlainNetCfg(strategy=BlockAttention(LayerAttnCfg('kcla', head_dim=16))))
default_cfgs = generate_default_cfgs({f'{n}.untrained': imagenet_cfg(first_conv='stem.0') for n in model_cfgs})
register_family(Family('plainnet_kcla', 'PlainNet KCLA', card='kcla'), model_cfgs)


@register_model
def plainnet6_kcla(pretrained: bool = False, **kwargs) -> PlainNet:
    """A plain six-conv net with KCLA on every unit."""
    return build_model('plainnet6_kcla', pretrained, **kwargs)


# The checks, run by tests/test_worked_examples.py.

def check_the_strategy_runs_on_the_new_trunk():
    model = timm.create_model('plainnet6_kcla', num_classes=5)
    assert all(type(unit.attn).__name__ == 'KCLA' for stage in model.stages() for unit in stage.blocks())
    x = torch.randn(2, 3, 32, 48)
    model.train()
    out = model(x)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref)


def check_the_carried_state_crosses_units_and_stages():
    model = timm.create_model('plainnet6_kcla').eval()
    first = model.stages()[0].blocks()[0].attn
    seen = []
    first.register_forward_hook(lambda m, args, out: seen.append(len(out[1])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen == [2]  # KCLA's [history, weight sum] leaves the first unit and is threaded onwards


def check_features_through_the_getter():
    features = timm.create_model('plainnet6_kcla', features_only=True, out_indices=(1, 2, 3))
    feats = features(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
