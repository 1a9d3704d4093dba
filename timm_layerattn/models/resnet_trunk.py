"""The ResNet trunk: an open ResNet (any stages, strides, stems, blocks, norm and activation) that hosts a
layer-interaction strategy.

The defaults are a torchvision / timm v1.5 ResNet (stride on the 3x3 conv, timm parameter names, so timm
`resnet*` weights load into the trunk). What makes a family is its `LayerStrategy` (`core.strategy`): the
modules it adds at the sites the trunk offers. The trunk threads the carried attention state through its
units (`core.units`); that state is why features are built on `forward_intermediates` (timm's `getter`
feature wrapper), never by re-running children one by one. docs/architecture.md draws the whole picture.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_act_layer, create_classifier, get_act_layer, get_device_dtype, get_norm_layer
from timm.models._features import feature_take_indices

from ..core.strategy import BlockSite, LayerStrategy, StageSite
from ..core.units import Dd, LAStage, Shared, State
from ..layers._checks import check_bool, check_choice, check_int, check_rate
from ._builder import register_trunk
from ._contract import check_image, check_trunk_args, classifier_head
from .resnet_blocks import BLOCKS, STEMS, LABlock, make_downsample

__all__ = ['ResNetLA', 'ResNetLACfg', 'make_stages']

LayerType = Union[str, Callable[..., nn.Module]]


def _take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's `feature_take_indices`, with an out-of-range index reported as given (-10, not normalised to -6)."""
    if isinstance(indices, (list, tuple)):
        for idx in indices:
            if isinstance(idx, int) and not -num_features <= idx < num_features:
                raise AssertionError(f'feature index {idx} is out of range ({-num_features} to {num_features - 1})')
    return feature_take_indices(num_features, indices)


@dataclass(frozen=True)
class ResNetLACfg:
    """Architecture of a ResNet trunk.

    Attributes:
        layers: Blocks per stage (any number of stages).
        channels: Inner width per stage (the bottleneck's 3x3 width); block output width is `channels *
            expansion`.
        block: A registered block type (`resnet_blocks.BLOCKS`: 'bottleneck', 'basic').
        expansion: Output width multiplier (default: the block type's, 4 for bottleneck, 1 for basic).
        strides: Stride of each stage's first block (default: 1 for the first stage, 2 for the others).
        stem_type: A registered stem (`resnet_blocks.STEMS`): '' (7x7/2 conv + 3x3/2 max-pool), 'deep'
            (three 3x3 convs + max-pool, timm `resnet50c` layout), 'cifar' (one 3x3 conv, stride 1, no
            pooling) or 'conv7_s1' (one 7x7 conv, stride 1, no pooling).
        stem_width: Stem width ('deep': width of the first two convs; output is twice that).
        act_layer: Activation of the stem and blocks (timm name or class).
        norm_layer: Norm of the stem, blocks and projections (timm name or class).
        zero_init_last: Zero-init the last BN of each residual block.
        out_channels: Block output width per stage, overriding `channels * expansion`.
        residual: 'proj' (identity, or 1x1 conv + BN projection where the shape changes; timm/torchvision),
            'pad' (option A: parameter-free subsample + zero channel padding) or 'none' (no residual).
        last_norm: 'bn' or 'ln' (LayerNorm over channels in place of each block's last BN).
        last_act: Activation after each block's last norm.
        stem_feat: Feature level 0: 'act' (stem activation, before the max-pool) or 'pool' (after it).
        strategy: The family's layer-interaction strategy, `None` for a plain ResNet.
        name: The registered variant, named by error messages (the class name when empty).
    """
    layers: Tuple[int, ...]
    channels: Tuple[int, ...] = (64, 128, 256, 512)
    block: str = 'bottleneck'
    expansion: Optional[int] = None
    strides: Optional[Tuple[int, ...]] = None
    stem_type: str = ''
    stem_width: int = 64
    act_layer: LayerType = 'relu'
    norm_layer: LayerType = 'batchnorm2d'
    zero_init_last: bool = True
    out_channels: Optional[Tuple[int, ...]] = None
    residual: str = 'proj'
    last_norm: str = 'bn'
    last_act: bool = True
    stem_feat: str = 'act'
    strategy: Optional[LayerStrategy] = None
    name: str = ''

    def __post_init__(self):
        owner = self.name or 'ResNetLACfg'
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f'{owner}: layers must be a non-empty tuple of stage depths, got {self.layers!r}')
        for depth in self.layers:
            check_int(owner, 'layers', depth, allowed='a tuple of positive stage depths')
        for field, values, what in (('channels', self.channels, 'widths'), ('out_channels', self.out_channels, 'widths'),
                                    ('strides', self.strides, 'strides')):
            if values is None and field != 'channels':
                continue
            if not isinstance(values, tuple) or len(values) != len(self.layers):
                raise ValueError(f'{owner}: {field} must be a tuple of {len(self.layers)} {what} (one per stage), '
                                 f'got {values!r}')
            for value in values:
                check_int(owner, field, value, allowed=f'a tuple of positive {what}')
        check_choice(owner, 'block', self.block, tuple(BLOCKS))
        if self.expansion is not None:
            check_int(owner, 'expansion', self.expansion)
        check_choice(owner, 'stem_type', self.stem_type, tuple(STEMS))
        check_int(owner, 'stem_width', self.stem_width)
        for field in ('act_layer', 'norm_layer'):
            value = getattr(self, field)
            if not (isinstance(value, str) or callable(value)):
                raise TypeError(f'{owner}: {field} must be a timm layer name or a module class, got {value!r}')
        check_choice(owner, 'residual', self.residual, ('proj', 'pad', 'none'))
        check_choice(owner, 'last_norm', self.last_norm, ('bn', 'ln'))
        check_choice(owner, 'stem_feat', self.stem_feat, ('act', 'pool'))
        check_bool(owner, 'zero_init_last', self.zero_init_last)
        check_bool(owner, 'last_act', self.last_act)
        if self.strategy is not None and not isinstance(self.strategy, LayerStrategy):
            raise TypeError(f'{owner}: strategy must be a LayerStrategy or None, got {self.strategy!r}')

    @property
    def stem_chs(self) -> int:
        """Stem output width."""
        return self.stem_width * STEMS[self.stem_type].width_mult

    @property
    def block_expansion(self) -> int:
        return self.expansion or BLOCKS[self.block].expansion

    @property
    def stage_strides(self) -> Tuple[int, ...]:
        """Stride of each stage's first block."""
        return self.strides or (1,) + (2,) * (len(self.layers) - 1)

    @property
    def num_feature_levels(self) -> int:
        """Feature levels: the stem's and one per stage (timm `feature_info`, `forward_intermediates`)."""
        return len(self.layers) + 1

    def block_widths(self) -> Tuple[int, ...]:
        """Block output width per stage."""
        return self.out_channels or tuple(c * self.block_expansion for c in self.channels)

    def block_inputs(self) -> List[int]:
        """Input width of every block, in network order."""
        inputs, chs = [], self.stem_chs
        for width, depth in zip(self.block_widths(), self.layers):
            for _ in range(depth):
                inputs.append(chs)
                chs = width
        return inputs

    def layer_types(self) -> Tuple[Type[nn.Module], Callable[..., nn.Module]]:
        """`(norm_layer, act_layer)` resolved to module classes."""
        return get_norm_layer(self.norm_layer), get_act_layer(self.act_layer)


def make_stages(
        cfg: ResNetLACfg,
        output_stride: int = 32,
        drop_path_rate: float = 0.,
        dd: Optional[Dd] = None,
) -> Tuple[List[LAStage], List[Dict[str, Any]]]:
    """Build the stages of `cfg` with its strategy's modules in place, and their `feature_info` entries.

    `drop_path_rate` goes to the strategy's branch when it has one (constant over depth, as in the official
    layer-attention models), else to the trunk residuals, rising linearly over the blocks (timm's rule).
    Once the network stride reaches `output_stride`, later stages dilate instead of striding.
    """
    dd = dd or {}
    strategy = cfg.strategy or LayerStrategy()
    norm_layer, act_layer = cfg.layer_types()
    branch_drop = strategy.branch_drop_path() is not None
    expansion = cfg.block_expansion
    block_cls = BLOCKS[cfg.block]
    stem = STEMS[cfg.stem_type]
    net_stride = stem.stride * (2 if stem.pool else 1)
    dilation = prev_dilation = 1
    in_chs, prev_chs = cfg.stem_chs, None
    num_blocks, block_id = sum(cfg.layers), 0
    prev_block: Optional[BlockSite] = None
    prev_stage: Optional[StageSite] = None
    stages, feature_info = [], []
    for stage_idx, (planes, depth, stride) in enumerate(zip(cfg.channels, cfg.layers, cfg.stage_strides)):
        if net_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            net_stride *= stride
        out_chs = cfg.out_channels[stage_idx] if cfg.out_channels else planes * expansion
        stage_site = StageSite(stage_idx, in_chs, out_chs, stride, prev_stage)
        pre = strategy.stage_entry(stage_site, dd)
        downsample = make_downsample(cfg.residual, in_chs, out_chs, stride, norm_layer, dd)
        blocks = []
        for block_idx in range(depth):
            site = BlockSite(stage_idx, block_idx, block_id, num_blocks, in_chs, out_chs, prev_chs,
                             stride if block_idx == 0 else 1, prev_block)
            trunk_drop = 0. if branch_drop else drop_path_rate * block_id / max(num_blocks - 1, 1)
            conv_input = strategy.block_conv_input(site, dd)
            blocks.append(block_cls(
                in_chs + (conv_input.extra_chs if conv_input is not None else 0), planes, site.stride,
                downsample=downsample if block_idx == 0 else None,
                dilation=dilation,
                first_dilation=prev_dilation,
                expansion=expansion,
                out_chs=out_chs,
                layer_attn=strategy.block_attn(site, drop_path_rate, norm_layer, dd),
                entry=strategy.block_entry(site, dd),
                pre_residual=strategy.block_pre_residual(site, norm_layer, dd),
                residual=cfg.residual != 'none',
                last_norm=cfg.last_norm,
                last_act=cfg.last_act,
                drop_path=trunk_drop,
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            ))
            blocks[-1].attn_cat = conv_input
            prev_dilation = dilation
            in_chs = prev_chs = out_chs
            prev_block = site
            block_id += 1
        stages.append(LAStage(*blocks, pre=pre, post=strategy.stage_exit(stage_site, dd)))
        feature_info.append(dict(num_chs=out_chs, reduction=net_stride, module=f'layer{stage_idx + 1}'))
        prev_stage = stage_site
    return stages, feature_info


class ResNetLA(nn.Module):
    """ResNet skeleton with a pluggable layer-interaction strategy (`ResNetLACfg.strategy`)."""

    def __init__(
            self,
            cfg: ResNetLACfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cfg: Architecture.
            num_classes: Classifier outputs (0 for no classifier).
            in_chans: Input image channels.
            global_pool: Global pooling type ('' for none).
            output_stride: 32, 16 or 8 (ImageNet stem); later stages are dilated instead of strided.
            drop_rate: Dropout before the classifier.
            drop_path_rate: For a strategy with its own branch (KCLA, MRLA): drop-path rate of that branch,
                constant over depth as in the official models (the trunk residual is never dropped); `None`:
                the strategy's default. Otherwise: stochastic depth of the residual branches, rising linearly
                to this rate over the blocks (timm's rule); an error for nets without residuals.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not isinstance(cfg, ResNetLACfg):
            raise TypeError(f'{type(self).__name__}: cfg must be a ResNetLACfg, got {cfg!r}')
        name = cfg.name or type(self).__name__
        num_classes, in_chans, output_stride, drop_rate = check_trunk_args(
            name, num_classes, in_chans, global_pool, output_stride, drop_rate)
        if drop_path_rate is not None:
            drop_path_rate = check_rate(name, 'drop_path_rate', drop_path_rate)
        strategy = cfg.strategy or LayerStrategy()
        strategy.check(cfg, name)
        branch_drop = strategy.branch_drop_path()
        if drop_path_rate is None:
            drop_path_rate = branch_drop if branch_drop is not None else 0.
        if drop_path_rate and branch_drop is None and cfg.residual == 'none':
            raise ValueError(
                f'{name}: drop_path_rate must be 0 for this model (it has no residual branch to drop), '
                f'got {drop_path_rate!r}')
        self.cfg = cfg
        self._name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        norm_layer, act_layer = cfg.layer_types()

        # Stem: `conv1` from the stem registry, then `bn1`, `act1` and the max-pool (an identity without one)
        stem = STEMS[cfg.stem_type]
        stem_chs = cfg.stem_chs
        self.conv1 = stem.conv(in_chans, cfg.stem_width, norm_layer, act_layer, dd)
        self.bn1 = norm_layer(stem_chs, **dd)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem.pool else nn.Identity()
        self.stem_pooled = cfg.stem_feat == 'pool'
        stem_reduction = stem.stride * (2 if self.stem_pooled and stem.pool else 1)
        self.feature_info = [dict(
            num_chs=stem_chs, reduction=stem_reduction, module='maxpool' if self.stem_pooled else 'act1')]

        # Stages
        stages, stage_info = make_stages(cfg, output_stride, drop_path_rate, dd)
        self.stage_names: Tuple[str, ...] = tuple(info['module'] for info in stage_info)
        for name_, stage in zip(self.stage_names, stages):
            self.add_module(name_, stage)
        self.feature_info += stage_info

        # Network-level module: its tensors are handed to every unit (see `_shared_tensors`).
        network = strategy.network_module(stages, dd)
        if network is not None:
            self.add_module(*network)

        # Neck (reads every feature level) and head
        self.num_features = stage_info[-1]['num_chs']
        self.neck: Optional[nn.Module] = strategy.neck([f['num_chs'] for f in self.feature_info], dd)
        if self.neck is not None:
            self.num_features = self.neck.num_features
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        self.init_weights(zero_init_last=cfg.zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Official init: kaiming fan-out for every Conv2d, BN 1/0, optionally zero last BN per block, then the
        strategy's own `init_weights` hook.

        Attention-specific 1-D convs, linears and MRLA's lambda keep their own init; so do LayerNorms (1/0).
        Residual-free blocks never zero their last norm (their output would be zero).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, LABlock):
                    m.zero_init_last()
        if self.cfg.strategy is not None:
            self.cfg.strategy.init_weights(self)

    @torch.jit.ignore
    def stages(self) -> List[LAStage]:
        return [getattr(self, n) for n in self.stage_names]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # A block's modules live inside the block, so `layerS.i` covers them. A stage's entry unit gets its own
        # group before the stage's first block, its exit unit joins the stage's last block; a network-level
        # module joins the stem (the first unit already uses it).
        blocks = r'^layer(\d+)' if coarse else [
            (r'^layer(\d+)\.attn_in\.', (-1,)),
            (r'^layer(\d+)\.(\d+)', None),
            (r'^layer(\d+)\.attn\.', (99999,)),  # timm's MATCH_PREV_GROUP
        ]
        stem = ['conv1', 'bn1', 'maxpool'] + [n for n, m in self.named_children() if hasattr(m, 'shared_tensors')]
        return dict(stem=r'^' + '|'.join(stem), blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes, self.global_pool, self.fc = classifier_head(
            self._name, self.num_features, num_classes, global_pool, self.global_pool.pool_type, self.training,
            get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(self._name, self.in_chans, x)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return x

    def _shared_tensors(self) -> Shared:
        """The network-level module's tensors (empty without one). A loop over the children with a static
        `hasattr` keeps this generic and scriptable."""
        shared: Shared = []
        for m in self.children():
            if hasattr(m, 'shared_tensors'):
                shared = m.shared_tensors()
        return shared

    def _forward_levels(self, x: torch.Tensor, num_stages: int,
                        keep: bool) -> Tuple[torch.Tensor, List[torch.Tensor], State]:
        """Stem and the first `num_stages` stages; the feature levels are returned when `keep` (else only the
        final map, so that each level is freed as early as possible), and the final carried state."""
        self._check_input(x)
        x = self.forward_stem(x)
        feats: List[torch.Tensor] = []
        if keep and not self.stem_pooled:
            feats.append(x)
        x = self.maxpool(x)
        if keep and self.stem_pooled:
            feats.append(x)
        state: State = []
        shared = self._shared_tensors()
        i = 0
        for stage in self.children():  # registration order; scriptable, unlike a list of modules
            if hasattr(stage, 'is_stage'):
                if i < num_stages:
                    x, state = stage(x, state, shared)
                    if keep:
                        feats.append(x)
                i += 1
        return x, feats, state

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the stem output (index 0) and stage outputs (1..N) selected by `indices`."""
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be NCHW, got {output_fmt!r}')
        take_indices, max_index = _take_indices(len(self.feature_info), indices)
        num_stages = max_index if stop_early else len(self.stage_names)
        x, feats, state = self._forward_levels(x, num_stages, keep=True)
        intermediates = [feats[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        if self.neck is not None and num_stages == len(self.stage_names):
            x = self.neck(feats + state)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages, neck and head that the selected intermediates do not need."""
        take_indices, max_index = _take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, LAStage())
        if max_index == 0 and not self.stem_pooled:
            self.maxpool = nn.Identity()
        prune_end = max_index < len(self.stage_names)
        if self.neck is not None and (prune_head or prune_end):
            self.neck = None
            self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        if self.cfg.strategy is not None:  # last: it sees what is left of stages, neck and head
            self.cfg.strategy.prune(self)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Only a neck reads every level; otherwise each is freed as soon as the next stage has run.
        x, feats, state = self._forward_levels(x, len(self.stage_names), keep=self.neck is not None)
        if self.neck is not None:
            x = self.neck(feats + state)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

register_trunk(ResNetLACfg, ResNetLA)
