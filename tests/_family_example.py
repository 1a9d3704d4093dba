"""The worked example of docs/add_a_family.md as a module: a new per-block family (DepthSE) made of a layer
module, a strategy, checkpoint rules and registration data only, with no edit to any existing file.

`tests/test_worked_examples.py` imports it in a fresh interpreter (so the family never leaks into the registry of
other tests) and runs the `check_*` functions: every generic part of the package (the builder, the kwargs, the
registry, the checkpoint entry points, `list_models`) must pick the family up by itself.
"""
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Type

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

import timm_layerattn
from timm_layerattn.checkpoints.rules import CheckpointRules
from timm_layerattn.core import BlockSite, Dd, LayerStrategy, TrunkCfg
from timm_layerattn.families import Family, ModelArg, family_of, imagenet_cfg, register_family
from timm_layerattn.layers._checks import check_int
from timm_layerattn.models._builder import build_model
from timm_layerattn.models.resnet_trunk import ResNetLA, ResNetLACfg


# 1. The layer module (layers/depth_se.py).
class DepthSE(nn.Module):
    """SE gate that also reads the previous block's pooled output: g = sigmoid(W2 relu(W1 p_t + U1 p_{t-1}))."""

    def __init__(self, channels: int, reduction: int = 16, first_in_stage: bool = False, device=None, dtype=None):
        super().__init__()
        check_int('DepthSE', 'reduction', reduction)
        hidden = max(channels // reduction, 1)
        self.w1 = nn.Linear(channels, hidden, bias=False, device=device, dtype=dtype)
        self.u1 = None if first_in_stage else nn.Linear(channels, hidden, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, channels, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor, state: Sequence[torch.Tensor]):
        p = x.mean((2, 3))
        h = self.w1(p)
        if self.u1 is not None:
            h = h + self.u1(state[0])
        return x * torch.sigmoid(self.w2(torch.relu(h)))[:, :, None, None], [p]


# 2. The strategy, in the family module.
@dataclass(frozen=True)
class DepthSEAttention(LayerStrategy):
    reduction: int = 16

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        check_int(owner, 'se_reduction', self.reduction, allowed=f'a positive integer up to {min(cfg.block_widths())}')
        if self.reduction > min(cfg.block_widths()):
            raise ValueError(f'{owner}: se_reduction must be at most {min(cfg.block_widths())}, got {self.reduction}')

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        return DepthSE(site.out_chs, self.reduction, first_in_stage=site.block_idx == 0, **dd)


# 3. The checkpoint rules (checkpoints/depth_se.py): no official layout, so only the native kind.
class DepthSERules(CheckpointRules):
    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return 'depth_se' if any(k.endswith('.attn.w1.weight') for k in keys) else None


# 4./5. Data, family and entrypoints (the bottom of the family module).
model_cfgs = dict(resnet26_dse=ResNetLACfg(layers=(2, 2, 2, 2), strategy=DepthSEAttention(16)))
default_cfgs = generate_default_cfgs({f'{n}.untrained': imagenet_cfg() for n in model_cfgs})
FAMILY = register_family(Family(
    'depth_se', 'DepthSE', card='kcla', rules=DepthSERules(),
    args=(ModelArg('se_reduction', 'strategy.reduction'),)), model_cfgs)


@register_model
def resnet26_dse(pretrained: bool = False, **kwargs: Any) -> ResNetLA:
    """ResNet-26 with DepthSE gates."""
    return build_model('resnet26_dse', pretrained, **kwargs)


# The checks, run by tests/test_worked_examples.py.

def check_the_new_family_is_a_timm_model():
    model = timm.create_model('resnet26_dse', num_classes=7)
    assert isinstance(model.layer2[1].attn, DepthSE) and model.layer2[0].attn.u1 is None
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    feats = timm.create_model('resnet26_dse', features_only=True)(x)
    assert [f.shape[1] for f in feats] == [64, 256, 512, 1024, 2048]


def check_the_registry_and_the_kwargs_cover_it():
    assert 'resnet26_dse' in timm_layerattn.models.list_models()
    assert family_of('resnet26_dse') is FAMILY and FAMILY.modules == [__name__]
    assert timm.create_model('resnet26_dse', se_reduction=8).cfg.strategy.reduction == 8
    with pytest.raises(ValueError, match='se_reduction must be at most 256'):
        timm.create_model('resnet26_dse', se_reduction=512)
    with pytest.raises(TypeError, match="does not take 'as_dim'|unexpected keyword"):
        timm.create_model('resnet26_dse', as_dim=64)


def check_its_checkpoints_load_through_timm(tmp_path):
    model = timm.create_model('resnet26_dse')
    path = tmp_path / 'dse.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    loaded = timm.create_model('resnet26_dse', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
