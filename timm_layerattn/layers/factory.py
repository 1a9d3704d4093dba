"""Layer-attention strategy config and the factory the ResNet skeleton calls per block."""
from dataclasses import dataclass, field
from typing import Optional, Tuple, Type

import torch.nn as nn

from ._checks import check_choice, check_int, check_rate
from .kcla import KCLA, KCLAVariant
from .mrla import MRLABase, MRLALight

__all__ = ['LayerAttnCfg', 'create_layer_attn', 'LAYER_ATTN_TYPES']

LAYER_ATTN_TYPES = ('kcla', 'mrla_light', 'mrla_base')


@dataclass(frozen=True)
class LayerAttnCfg:
    """Which layer attention a ResNet uses and its per-network settings.

    Attributes:
        type: One of `LAYER_ATTN_TYPES`.
        head_dim: Channels per attention head.
        drop_path: Default drop-path rate of the attention branch (the model's `drop_path_rate` overrides).
        rebuild_blocks: KCLA only: block indices (within every stage) whose cell re-summarises the
            carried history. Official ImageNet code: `(0, 11)`; official CIFAR code: `(0,)`.
        kcla: KCLA only: the Table V ablations (`KCLAVariant`); the default is KCLA itself.
    """
    type: str
    head_dim: int
    drop_path: float = 0.
    rebuild_blocks: Tuple[int, ...] = (0,)
    kcla: KCLAVariant = field(default_factory=KCLAVariant)

    def __post_init__(self):
        owner = 'LayerAttnCfg'
        check_choice(owner, 'type', self.type, LAYER_ATTN_TYPES)
        check_int(owner, 'head_dim', self.head_dim)
        check_rate(owner, 'drop_path', self.drop_path)
        if not isinstance(self.rebuild_blocks, tuple):
            raise TypeError(f'{owner}: rebuild_blocks must be a tuple of block indices, got {self.rebuild_blocks!r}')
        for idx in self.rebuild_blocks:
            check_int(owner, 'rebuild_blocks', idx, minimum=0, allowed='a tuple of non-negative block indices')
        if not isinstance(self.kcla, KCLAVariant):
            raise TypeError(f'{owner}: kcla must be a KCLAVariant, got {self.kcla!r}')
        if self.type != 'kcla' and self.kcla != KCLAVariant():
            raise ValueError(
                f'{owner}: kcla must be the default KCLAVariant() for type {self.type!r}, got {self.kcla!r}')

    @property
    def carries_across_stages(self) -> bool:
        """Whether the state crosses stage boundaries through re-summary cells (KCLA without `cross_stage`
        restarts it instead)."""
        return self.type == 'kcla' and 0 in self.rebuild_blocks and self.kcla.cross_stage


def create_layer_attn(
        cfg: Optional[LayerAttnCfg],
        channels: int,
        prev_channels: Optional[int],
        block_idx: int,
        stride: int,
        drop_path: float,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
) -> Optional[nn.Module]:
    """Build the attention module of one block.

    Args:
        cfg: Strategy config, `None` for a plain block.
        channels: Block output width.
        prev_channels: Output width of the previous block, `None` for the network's first block.
        block_idx: Index of the block within its stage.
        stride: Spatial stride of the block (1 when dilated).
        drop_path: Drop-path rate of the attention branch.
    """
    if cfg is None:
        return None
    dd = dict(device=device, dtype=dtype)
    if cfg.type == 'kcla':
        restart = prev_channels is not None and block_idx == 0 and not cfg.kcla.cross_stage
        rebuild = prev_channels is not None and block_idx in cfg.rebuild_blocks and not restart
        return KCLA(
            channels, head_dim=cfg.head_dim, in_channels=prev_channels, rebuild=rebuild,
            history_stride=stride, drop_path=drop_path, norm_layer=norm_layer, variant=cfg.kcla, restart=restart,
            **dd)
    if cfg.type == 'mrla_light':
        return MRLALight(channels, head_dim=cfg.head_dim, drop_path=drop_path, norm_layer=norm_layer, **dd)
    return MRLABase(
        channels, head_dim=cfg.head_dim, first_in_stage=block_idx == 0, drop_path=drop_path,
        norm_layer=norm_layer, **dd)
