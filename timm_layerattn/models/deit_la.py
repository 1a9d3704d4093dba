"""DeiT vision transformers with layer attention: MRLA-light, MRLA-base and KCLA on the patch-token grid.

Papers:
* `Cross-Layer Retrospective Retrieving via Layer Attention` (MRLA, ICLR 2023) - https://arxiv.org/abs/2302.03985,
  code: github.com/joyfang1106/MRLA (`deit/deit_mrla_light.py`, `deit/deit_mrla_base.py`)
* `Enhancing Layer Interaction Using Key-Correlated Layer Attention` (KCLA) - code: github.com/bgx666/KCLA
  (no ViT code exists; the ViT placement is this package's design)

The trunk is timm's own `VisionTransformer` (DeiT-Tiny / Small / Base settings); its blocks are timm's `Block`
plus one layer-attention module each (`blocks.i.layer_attn`), and the network threads the carried state
(MRLA-base's key / value cache, KCLA's history) from block to block. Any image size works (`dynamic_img_size`
is on by default), the grid may be non-square and any prefix tokens (class, registers) are allowed: the grid
is the tokens after `num_prefix_tokens`, shaped by the patch embedding's actual grid. At 224 px with one class
token the defaults compute what the official modules compute, so official checkpoints convert and match.
The maths and every decision: docs/design/vit_layer_attention.md.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from timm.layers import register_notrace_function, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer

from ..checkpoints import deit_mrla
from ..core.strategy import BlockSite, LayerStrategy, TrunkCfg
from ..core.units import Dd, State, checkpoint_unit
from ..families import Family, ModelArg, pretrained_cfg, register_family
from ..layers import native
from ..layers._checks import check_bool, check_choice, check_divisor, check_int, check_rate, divisors
from ..layers.factory import LayerAttnCfg, create_layer_attn
from ..layers.kcla import KCLAVariant
from ..layers.vit_la import GridCell, MRLABaseTokens, MRLALightTokens
from . import resnet_la
from ._builder import build_model, register_trunk
from ._contract import check_image

__all__ = ['TokenAttnCfg', 'TokenAttention', 'DeiTLACfg', 'ViTLABlock', 'ViTLABlocks', 'VisionTransformerLA']

TOKEN_ATTN_TYPES = ('mrla_light', 'mrla_base', 'kcla')


@dataclass(frozen=True)
class TokenAttnCfg:
    """Which layer attention a ViT uses and its settings.

    Attributes:
        type: One of `TOKEN_ATTN_TYPES`.
        head_dim: Channels per layer-attention head (16 in the official DeiT-MRLA code).
        reset_every: MRLA-base: blocks `i` with `i % reset_every == 0` start a new key / value cache (official: 4,
            #vit-mrlab-reset); 0 never resets after block 0.
        prefix_norm: MRLA: add the normalised block output to the prefix tokens, as the official modules do
            (#vit-prefix-quirk); KCLA leaves prefix tokens alone.
        kcla: KCLA: the Table V ablations (`KCLAVariant`; `cross_stage` stays True: one stage).
    """
    type: str
    head_dim: int = 16
    reset_every: int = 4
    prefix_norm: bool = True
    kcla: KCLAVariant = field(default_factory=KCLAVariant)

    def __post_init__(self):
        owner = 'TokenAttnCfg'
        check_choice(owner, 'type', self.type, TOKEN_ATTN_TYPES)
        check_int(owner, 'head_dim', self.head_dim)
        check_int(owner, 'reset_every', self.reset_every, minimum=0)
        check_bool(owner, 'prefix_norm', self.prefix_norm)
        if not isinstance(self.kcla, KCLAVariant) or not self.kcla.cross_stage:
            raise ValueError(f'{owner}: kcla must be a KCLAVariant with cross_stage=True, got {self.kcla!r}')


@dataclass(frozen=True)
class TokenAttention(LayerStrategy):
    """One layer-attention module on the patch grid of every transformer block's output."""
    attn: TokenAttnCfg

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        width = cfg.block_widths()[0]
        check_divisor(owner, 'head_dim', self.attn.head_dim, divisors(width),
                      f'channels per head: the embedding width {width} must be divisible into heads')

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd,
                   num_prefix_tokens: int = 1) -> Optional[nn.Module]:
        """The block's module, `(x, shortcut, state, grid_h, grid_w) -> (x, state)`; `drop_path` (the block's
        stochastic-depth rate) applies to KCLA's branch only: the official MRLA branches have none."""
        a = self.attn
        if a.type == 'mrla_light':
            return MRLALightTokens(site.out_chs, a.head_dim, num_prefix_tokens, a.prefix_norm, norm_layer, **dd)
        if a.type == 'mrla_base':
            reset = site.block_idx == 0 or (a.reset_every > 0 and site.block_idx % a.reset_every == 0)
            return MRLABaseTokens(site.out_chs, a.head_dim, reset, num_prefix_tokens, a.prefix_norm, norm_layer, **dd)
        # KCLA: the ResNet cell unchanged (BatchNorm over the grid), one history through all blocks (#vit-kcla).
        cell = create_layer_attn(
            LayerAttnCfg('kcla', a.head_dim, rebuild_blocks=(0,), kcla=a.kcla), site.out_chs, site.prev_chs,
            site.block_idx, 1, drop_path, norm_layer=nn.BatchNorm2d, **dd)
        return GridCell(cell, num_prefix_tokens)


@torch.fx.wrap
@register_notrace_function  # an fx leaf: timm's resampling branches on the sizes
def _resample_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, old_h: int, old_w: int,
                        num_prefix_tokens: int) -> torch.Tensor:
    """timm's `resample_abs_pos_embed` of the table (trained on an `old_h x old_w` grid) to `grid_h x grid_w`."""
    return resample_abs_pos_embed(
        pos_embed, new_size=[grid_h, grid_w], old_size=[old_h, old_w], num_prefix_tokens=num_prefix_tokens)


@dataclass(frozen=True)
class DeiTLACfg:
    """Architecture of a DeiT with layer attention (the `TrunkCfg` of `VisionTransformerLA`).

    Attributes:
        embed_dim, num_heads, depth, patch_size: timm's DeiT settings.
        strategy: The layer attention (`TokenAttention`).
        name: The registered variant (set by the builder, for messages).
    """
    embed_dim: int
    num_heads: int
    depth: int = 12
    patch_size: int = 16
    strategy: Optional[TokenAttention] = None
    name: str = ''

    def block_widths(self) -> Tuple[int, ...]:
        return (self.embed_dim,)

    def block_inputs(self) -> List[int]:
        return [self.embed_dim] * self.depth

    @property
    def num_feature_levels(self) -> int:
        """One feature level per block, as timm's ViT."""
        return self.depth


class ViTLABlock(Block):
    """timm's pre-norm transformer block followed by a layer-attention module (`layer_attn`) that reads the block
    output, the block input and the carried state on the patch grid."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            strategy: TokenAttention,
            num_blocks: int,
            num_prefix_tokens: int = 1,
            depth: int = 0,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, depth=depth, drop_path=drop_path, norm_layer=norm_layer, **dd, **kwargs)
        site = BlockSite(
            stage_idx=0, block_idx=depth, block_id=depth, num_blocks=num_blocks, in_chs=dim, out_chs=dim,
            prev_chs=dim if depth > 0 else None, stride=1)
        self.layer_attn = strategy.block_attn(site, drop_path, norm_layer, dd, num_prefix_tokens=num_prefix_tokens)

    def forward(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
            grid_h: int,
            grid_w: int,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        shortcut = x
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self.layer_attn(x, shortcut, state, grid_h, grid_w)


class ViTLABlocks(nn.Sequential):
    """The transformer blocks, run in order with the carried layer-attention state (timm's `nn.Sequential` of
    blocks passes one tensor). Slicing (`prune_intermediate_layers`) keeps the class."""

    def forward(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
            grid_h: int,
            grid_w: int,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        for block in self:
            x, state = block(x, state, grid_h, grid_w, attn_mask, is_causal)
        return x, state


# timm's pooling types of `VisionTransformer`.
POOL_TYPES = ('', 'avg', 'avgmax', 'max', 'token', 'map', 'prr')


def _check_vit_kwargs(owner: str, kwargs: Dict[str, Any]) -> None:
    """timm's ViT kwargs that its constructor would take silently or fail on later, refused in one line."""
    ints = dict(num_classes=0, in_chans=1, reg_tokens=0)
    for key, minimum in ints.items():
        if key in kwargs:
            check_int(owner, key, kwargs[key], minimum=minimum)
    for key in ('drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate'):
        if kwargs.get(key) is not None:
            check_rate(owner, key, kwargs[key])
    for key in ('class_token', 'no_embed_class', 'dynamic_img_size', 'dynamic_img_pad'):
        if key in kwargs:
            check_bool(owner, key, kwargs[key])
    pool = check_choice(owner, 'global_pool', kwargs.get('global_pool', 'token'), POOL_TYPES)
    if pool == 'token' and not kwargs.get('class_token', True):
        raise ValueError(f"{owner}: global_pool='token' needs the class token; pass global_pool='avg' with "
                         f"class_token=False")


class VisionTransformerLA(VisionTransformer):
    """timm's `VisionTransformer` whose blocks are `ViTLABlock`s threading the layer-attention state.

    Everything else (patch and position embedding, prefix tokens, pooling, head, weight init, `set_input_size`,
    pruning, parameter groups) is timm's. `dynamic_img_size` and `dynamic_img_pad` default to True, so any input
    of at least one patch works (zero-padded to whole patches; nothing changes at 224 px); `patch_drop_rate` must
    stay 0 (the modules read the whole patch grid).
    """

    def __init__(
            self,
            cfg: DeiTLACfg,
            dynamic_img_size: bool = True,
            dynamic_img_pad: bool = True,
            patch_drop_rate: float = 0.,
            **kwargs: Any,
    ):
        owner = cfg.name or type(self).__name__
        if patch_drop_rate != 0:
            raise ValueError(f'{owner}: patch_drop_rate must be 0 (layer attention reads the whole patch grid), '
                             f'got {patch_drop_rate!r}')
        for key in ('embed_dim', 'num_heads', 'depth', 'patch_size', 'block_fn'):
            if key in kwargs:
                raise TypeError(f'{owner} does not take {key!r} (fixed by the architecture)')
        _check_vit_kwargs(owner, kwargs)
        if cfg.strategy is None:
            raise ValueError(f"{owner}: a layer-attention strategy is needed; timm's deit_* are the plain models")
        cfg.strategy.check(cfg, owner)
        num_prefix_tokens = int(bool(kwargs.get('class_token', True))) + int(kwargs.get('reg_tokens', 0) or 0)
        block_fn = partial(ViTLABlock, strategy=cfg.strategy, num_blocks=cfg.depth, num_prefix_tokens=num_prefix_tokens)
        super().__init__(
            patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, depth=cfg.depth,
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad, block_fn=block_fn, **kwargs)
        self.blocks = ViTLABlocks(*self.blocks)
        self.cfg = cfg
        self._name = owner
        self._patch = cfg.patch_size

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier, or its name (`head`) with `name_only`, as every model of this package answers."""
        return 'head' if name_only else self.head

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(self._name, self.in_chans, x, self._patch)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's position embedding; a `dynamic_img_size` NHWC map is first flattened here with `reshape` (timm's
        `view(B, -1, C)` cannot size an empty batch) and the table resampled to its grid, then timm's own
        embedding of a token sequence (prefix tokens, `no_embed_class`) runs with it."""
        if not self.dynamic_img_size:  # already a token sequence, at the table's grid
            return self._embed_tokens(x, self.pos_embed)
        b, h, w, c = x.shape
        if self.pos_embed is None:
            return self._embed_tokens(x.reshape(b, h * w, c), None)
        old_h, old_w = self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]
        pos_embed = _resample_pos_embed(
            self.pos_embed, h, w, old_h, old_w, 0 if self.no_embed_class else self.num_prefix_tokens)
        return self._embed_tokens(x.reshape(b, h * w, c), pos_embed)

    def _embed_tokens(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
        to_cat: List[torch.Tensor] = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
        if pos_embed is not None and self.no_embed_class:
            x = x + pos_embed
        if len(to_cat) > 0:
            x = torch.cat(to_cat + [x], dim=1)
        if pos_embed is not None and not self.no_embed_class:
            x = x + pos_embed
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Tokens after the patch / position embedding, and the patch grid's height and width."""
        self._check_input(x)
        x = self.patch_embed(x)
        if self.dynamic_img_size:  # NHWC until `_pos_embed` flattens it
            grid_h, grid_w = x.shape[1], x.shape[2]
        else:
            grid_h, grid_w = self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        return x, grid_h, grid_w

    def _block(
            self,
            block: nn.Module,
            x: torch.Tensor,
            state: State,
            grid_h: int,
            grid_w: int,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Tuple[torch.Tensor, State]:
        """One block; with grad checkpointing the carried state is passed as tensor arguments (`checkpoint_unit`)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_unit(
                lambda t, s, _: block(t, s, grid_h, grid_w, attn_mask, is_causal), x, state, [])
        return block(x, state, grid_h, grid_w, attn_mask, is_causal)

    @torch.jit.unused
    def _math_attention(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` with PyTorch's math attention kernel: the fused CPU kernel of `scaled_dot_product_attention`
        has no forward-mode derivative, so `torch.func.jvp` / `forward_ad` (and the other transforms, for one rule)
        take the composite form, which computes the same function."""
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args)

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles this branch only when it is a separate `if`)
            if native.transforms_active():
                return self._math_attention(self._forward_features, x, attn_mask, is_causal)
        return self._forward_features(x, attn_mask, is_causal)

    def _forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> torch.Tensor:
        x, grid_h, grid_w = self._embed(x)
        state: List[torch.Tensor] = []
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x, state = self._block(block, x, state, grid_h, grid_w, attn_mask, is_causal)
        else:
            x, state = self.blocks(x, state, grid_h, grid_w, attn_mask, is_causal)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's `forward_intermediates` (same arguments and outputs), threading the layer-attention state; the
        NCHW maps take the grid of the patch embedding and are channels_last (the token layout)."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        args = (x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only, output_dict,
                attn_mask, is_causal)
        if not torch.jit.is_scripting():
            if native.transforms_active():
                return self._math_attention(self._forward_intermediates, *args)
        return self._forward_intermediates(*args)

    def _forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]],
            return_prefix_tokens: bool,
            norm: bool,
            stop_early: bool,
            output_fmt: str,
            intermediates_only: bool,
            output_dict: bool,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid_h, grid_w = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        state: List[torch.Tensor] = []
        intermediates: List[torch.Tensor] = []
        for i, block in enumerate(blocks):
            x, state = self._block(block, x, state, grid_h, grid_w, attn_mask, is_causal)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == 'NCHW':  # the token grid is NHWC: as an NCHW map it is channels_last (one copy, no transpose)
            intermediates = [
                y.reshape(y.shape[0], grid_h, grid_w, y.shape[-1]).permute(0, 3, 1, 2).contiguous(
                    memory_format=torch.channels_last) for y in intermediates]
        if output_dict:
            out: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                out['image_features'] = self.norm(x)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


register_trunk(DeiTLACfg, VisionTransformerLA)


def _check_head_dim(variant: str, head_dim: Any, arch: DeiTLACfg) -> None:
    check_divisor(variant, 'head_dim', head_dim, divisors(arch.embed_dim),
                  f'channels per head: the embedding width {arch.embed_dim} must be divisible into heads')


def _check_cross_stage(variant: str, value: Any, arch: DeiTLACfg) -> None:
    if not check_bool(variant, 'cross_stage', value):
        raise ValueError(f'{variant}: cross_stage must be True (a ViT has one stage and one width: its KCLA '
                         f'history runs through every block), got {value!r}')


def _is(*types: str):
    return lambda arch: arch.strategy.attn.type in types


# Model kwargs beyond timm's ViT ones (each stated once; `docs/design/vit_layer_attention.md#vit-args`).
HEAD_DIM = ModelArg('head_dim', path='strategy.attn.head_dim', check=_check_head_dim)
RESET_EVERY = ModelArg('reset_every', path='strategy.attn.reset_every', takes=_is('mrla_base'))
PREFIX_NORM = ModelArg('prefix_norm', path='strategy.attn.prefix_norm', takes=_is('mrla_light', 'mrla_base'))
# KCLA's Table V ablations, as on the ResNets (docs/design/layer_attention.md#la-kcla-ablations).
KCLA_ARGS = tuple(a if a.name != 'cross_stage' else
                  ModelArg('cross_stage', check=_check_cross_stage, apply=lambda arch, value: arch)
                  for a in resnet_la.KCLA_ARGS)


def _deit(embed_dim: int, num_heads: int, kind: str) -> DeiTLACfg:
    return DeiTLACfg(embed_dim=embed_dim, num_heads=num_heads, strategy=TokenAttention(TokenAttnCfg(
        kind, head_dim=16, prefix_norm=kind != 'kcla')))


_SIZES = dict(tiny=(192, 3), small=(384, 6), base=(768, 12))
_SUFFIX = dict(mrlal='mrla_light', mrlab='mrla_base', kcla='kcla')

model_cfgs = {
    **{f'deit_{size}_patch16_224_{s}': _deit(*_SIZES[size], _SUFFIX[s])
       for s in ('mrlal', 'mrlab') for size in ('tiny', 'small', 'base')},
    **{f'deit_{size}_patch16_224_kcla': _deit(*_SIZES[size], 'kcla') for size in ('tiny', 'small')},
}


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm's DeiT pretrained config (bicubic, crop 0.875, `patch_embed.proj`, `head`)."""
    return pretrained_cfg(**{
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'interpolation': 'bicubic',
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'first_conv': 'patch_embed.proj',
        'classifier': 'head', 'fixed_input_size': False, **kwargs})


_MRLA_CFG = dict(origin_url='https://github.com/joyfang1106/MRLA', paper_ids='arXiv:2302.03985')
default_cfgs = generate_default_cfgs({
    f'{name}.untrained': _cfg(**(_MRLA_CFG if not name.endswith('kcla') else
                                 dict(origin_url='https://github.com/bgx666/KCLA')))
    for name in model_cfgs})

FAMILIES = {
    'mrla_light': Family('deit_mrla_light', 'DeiT + MRLA-light', card='deit_mrla_l',
                         rules=deit_mrla.RULES['deit_mrla_light'], args=(HEAD_DIM, PREFIX_NORM)),
    'mrla_base': Family('deit_mrla_base', 'DeiT + MRLA-base', card='deit_mrla_b',
                        rules=deit_mrla.RULES['deit_mrla_base'], args=(HEAD_DIM, RESET_EVERY, PREFIX_NORM)),
    'kcla': Family('deit_kcla', 'DeiT + KCLA', card='deit_kcla', rules=deit_mrla.RULES['deit_kcla'],
                   args=(*KCLA_ARGS, HEAD_DIM)),
}
for _name, _arch in model_cfgs.items():
    register_family(FAMILIES[_arch.strategy.attn.type], {_name: _arch}, module=__name__)


@register_model
def deit_tiny_patch16_224_mrlal(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Tiny with MRLA-light (head dim 16)."""
    return build_model('deit_tiny_patch16_224_mrlal', pretrained, **kwargs)


@register_model
def deit_small_patch16_224_mrlal(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Small with MRLA-light (head dim 16)."""
    return build_model('deit_small_patch16_224_mrlal', pretrained, **kwargs)


@register_model
def deit_base_patch16_224_mrlal(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Base with MRLA-light (head dim 16)."""
    return build_model('deit_base_patch16_224_mrlal', pretrained, **kwargs)


@register_model
def deit_tiny_patch16_224_mrlab(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Tiny with MRLA-base (head dim 16, caches reset every 4 blocks)."""
    return build_model('deit_tiny_patch16_224_mrlab', pretrained, **kwargs)


@register_model
def deit_small_patch16_224_mrlab(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Small with MRLA-base (head dim 16, caches reset every 4 blocks)."""
    return build_model('deit_small_patch16_224_mrlab', pretrained, **kwargs)


@register_model
def deit_base_patch16_224_mrlab(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Base with MRLA-base (head dim 16, caches reset every 4 blocks)."""
    return build_model('deit_base_patch16_224_mrlab', pretrained, **kwargs)


@register_model
def deit_tiny_patch16_224_kcla(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Tiny with Key-Correlated Layer Attention on the patch grid (head dim 16)."""
    return build_model('deit_tiny_patch16_224_kcla', pretrained, **kwargs)


@register_model
def deit_small_patch16_224_kcla(pretrained: bool = False, **kwargs) -> VisionTransformerLA:
    """DeiT-Small with Key-Correlated Layer Attention on the patch grid (head dim 16)."""
    return build_model('deit_small_patch16_224_kcla', pretrained, **kwargs)
