"""ResNets with attention shortcuts (AS_out, AS_KV, AS_stages) and the paper's baselines, ImageNet stem.

Paper: `Introducing attention shortcuts in convolutional neural networks` (D. Erroz, M. Galar, AIMS
Mathematics 2025, CC BY 4.0). No public code exists; the interpretation follows the design notes
(docs/design/attention_shortcuts.md: decisions at #as-decisions, parameter tables at #as-param-counts,
reproduced exactly). The `#as-...` anchors cited below are sections of that page.

All variants are strategies on the `ResNetLA` skeleton:

* AS_out / AS_KV: the residual sum is replaced by `g_l`, per-pixel multi-head attention over the cached
  keys/values of all earlier block outputs (stem output included), in front of every residual-free
  bottleneck that ends in LayerNorm + ReLU. AS_out projects every output to a common width (128) and
  subsamples the cache at strides; AS_KV keeps widths 1/4 of ResNet-50's and converts the cache with
  1x1 stride-2 convs. K/V/O projections are shared by all sites of a width (`as_proj.w{C}`, one owner;
  the blocks receive their weights), W^Q is per site (`layerS.i.attn_in.q`).
* AS_stages: the unchanged ResNet (residuals kept); the input of stages 2-4 is attention over the earlier
  stages' outputs (`layerS.attn_in`, pre-LayerNorm, own projections).
* Baselines: ResNet-50 (timm's), ResNet-50 0.5x (block outputs halved, #as-half-baseline) and plain
  ResNet-50 (no shortcuts at all, #as-plain-baseline).

The ImageNet-stem models are our extension (#as-stems), e.g. as detection backbones; the paper's CIFAR models
are in `cifar_resnet_as`.
"""
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import attention_shortcuts
from ..core.strategy import BlockSite, LayerStrategy, StageSite, Trunk
from ..core.units import Dd, LAStage
from ..families import Family, ModelArg, imagenet_cfg, register_family
from ..layers._checks import check_bool, check_choice, check_divisor, check_int, divisors, fmt_ints
from ..layers.shortcut import AttentionShortcut, ShortcutCfg, ShortcutProjections, create_shortcut_site
from ._builder import build_model
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['AttentionShortcuts', 'as_arch', 'checkpoint_filter_fn', 'AS_FAMILY']

_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_INNER = (64, 128, 256, 512)
AS_PAPER = 'Introducing attention shortcuts in convolutional neural networks'


@dataclass(frozen=True)
class AttentionShortcuts(LayerStrategy):
    """Attention-shortcut sites in front of every block (AS_out, AS_KV) or between stages (AS_stages).

    Block sites share their width's K/V/O projections, owned once by the network (`as_proj`, a
    network-level module whose weights reach every site at call time); stage sites own theirs.
    """
    cfg: ShortcutCfg

    @property
    def block_sites(self) -> bool:
        return self.cfg.placement == 'block'

    def check(self, cfg: ResNetLACfg, owner: str) -> None:
        if self.block_sites and (cfg.block != 'bottleneck' or cfg.residual != 'none'):
            raise ValueError("attention shortcuts in front of blocks need block='bottleneck', residual='none' "
                             "and no layer attention")
        # Input width of every site: each block's input, or each later stage's input.
        widths = cfg.block_inputs() if self.block_sites else list(cfg.block_widths()[:-1])
        why = f'attention heads: every attention-shortcut site width {fmt_ints(sorted(set(widths)))} must be ' \
              f'divisible into heads'
        check_divisor(owner, 'as_heads (ShortcutCfg.num_heads)', self.cfg.num_heads,
                      divisors(math.gcd(*widths)), why)

    def block_entry(self, site: BlockSite, dd: Dd) -> Optional[nn.Module]:
        if not self.block_sites:
            return None
        # The cache arrives at the previous block's input width and resolution.
        prev = site.prev
        cache_dim, cache_stride = (prev.in_chs, prev.stride) if prev is not None else (None, 1)
        return create_shortcut_site(self.cfg, site.in_chs, cache_dim, cache_stride, **dd)

    def stage_entry(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        # Stage s's input is g(X_1 .. X_{s-1}) over the earlier stages' outputs; stage 0 has no site.
        if self.block_sites or site.stage_idx == 0:
            return None
        prev = site.prev if site.stage_idx > 1 else None
        cache_dim, cache_stride = (prev.in_chs, prev.stride) if prev is not None else (None, 1)
        return create_shortcut_site(self.cfg, site.in_chs, cache_dim, cache_stride, **dd)

    def network_module(self, stages: Sequence[LAStage], dd: Dd) -> Optional[Tuple[str, nn.Module]]:
        if not self.block_sites:
            return None
        sites = _block_sites(stages)
        queried = [s.dim for s in sites if s.has_query] if self.cfg.q_proj == 'shared' else []
        proj = ShortcutProjections([s.dim for s in sites], queried, **dd)
        proj.bind(sites)
        return 'as_proj', proj

    def prune(self, model: Trunk) -> None:
        proj = getattr(model, 'as_proj', None)
        if isinstance(proj, ShortcutProjections):
            proj.prune(_block_sites(model.stages()))
        stage_sites = [s.attn_in for s in model.stages() if isinstance(getattr(s, 'attn_in', None), AttentionShortcut)]
        if len(stage_sites) == 1:
            stage_sites[0].drop_key()


def _block_sites(stages: Sequence[LAStage]) -> List[AttentionShortcut]:
    return [b.attn_in for stage in stages for b in stage.blocks() if isinstance(b.attn_in, AttentionShortcut)]



def as_arch(kind: str, depth: int = 50, stem_type: str = '', zero_init_last: bool = True) -> ResNetLACfg:
    """Architecture of one variant: 'as_out', 'as_kv', 'as_stages', '' (ResNet), 'half' or 'plain'."""
    base = ResNetLACfg(layers=_DEPTHS[depth], channels=_INNER, stem_type=stem_type, zero_init_last=zero_init_last)
    if kind == 'as_out':
        # Table 1 middle column (#as-out): stem and every block output 128 wide; the cache is subsampled
        # (#as-cache-subsample).
        return replace(
            base, stem_width=128, out_channels=(128,) * 4, residual='none', last_norm='ln', zero_init_last=False,
            strategy=AttentionShortcuts(ShortcutCfg(placement='block', downsample='subsample')))
    if kind == 'as_kv':
        # Table 1 right column (#as-kv): block outputs 1/4 of ResNet-50's; K/V adapters at each stride
        # (#as-cache-adapters, #as-kv-transition).
        return replace(
            base, expansion=1, residual='none', last_norm='ln', zero_init_last=False,
            strategy=AttentionShortcuts(ShortcutCfg(placement='block', downsample='conv')))
    if kind == 'as_stages':
        return replace(base, strategy=AttentionShortcuts(ShortcutCfg(placement='stage', downsample='conv', pre_norm=True)))
    if kind == 'half':
        return replace(base, expansion=2)  # block output widths halved, inner widths kept (#as-half-baseline)
    if kind == 'plain':
        return replace(base, residual='none')  # no identity and no projection shortcuts (#as-plain-baseline)
    if kind == '':
        return base
    raise ValueError(f'Unknown attention-shortcut variant {kind!r}')


def _shortcuts(arch: ResNetLACfg) -> Optional[ShortcutCfg]:
    return arch.strategy.cfg if isinstance(arch.strategy, AttentionShortcuts) else None


def _takes(**want: Any) -> Callable[[ResNetLACfg], bool]:
    """Which variants take a kwarg: those with attention shortcuts whose `ShortcutCfg` has the given fields."""
    def takes(arch: ResNetLACfg) -> bool:
        sc = _shortcuts(arch)
        return sc is not None and all(getattr(sc, k) == v for k, v in want.items())
    return takes


def _check_as_dim(variant: str, as_dim: Any, arch: ResNetLACfg) -> None:
    heads = _shortcuts(arch).num_heads
    check_int(variant, 'as_dim', as_dim, allowed=f'a positive multiple of as_heads ({heads})')
    if as_dim % heads:
        raise ValueError(f'{variant}: as_dim must be a positive multiple of as_heads ({heads}), got {as_dim!r}')


# The family's model kwargs (#as-kwargs), in the order they apply (`as_dim` is checked against the heads).
AS_ARGS = (
    # Attention heads h (4).
    ModelArg('as_heads', 'strategy.cfg.num_heads', takes=_takes(),
             check=lambda variant, v, arch: check_int(variant, 'as_heads', v)),
    # Common width of AS_out: stem and every block output (128).
    ModelArg('as_dim', takes=_takes(placement='block', downsample='subsample'), check=_check_as_dim,
             apply=lambda arch, v: replace(arch, stem_width=v, out_channels=(v,) * len(arch.layers))),
    # 'per_site' or 'shared' W^Q (AS_out, AS_KV; #as-projection-sharing).
    ModelArg('q_proj', 'strategy.cfg.q_proj', takes=_takes(placement='block'),
             check=lambda variant, v, arch: check_choice(variant, 'q_proj', v, ('per_site', 'shared'))),
    # 'separate' or 'shared' K/V cache adapter (AS_KV, AS_stages; #as-cache-adapters).
    ModelArg('kv_adapter', 'strategy.cfg.kv_adapter', takes=_takes(downsample='conv'),
             check=lambda variant, v, arch: check_choice(variant, 'kv_adapter', v, ('separate', 'shared'))),
    # ReLU after each block's LayerNorm (AS_out, AS_KV; #as-block-ending).
    ModelArg('act_after_ln', 'last_act', takes=_takes(placement='block'),
             check=lambda variant, v, arch: check_bool(variant, 'act_after_ln', v)),
    # LayerNorm on each site's input (AS_stages; #as-stages-design).
    ModelArg('pre_ln', 'strategy.cfg.pre_norm', takes=_takes(placement='stage'),
             check=lambda variant, v, arch: check_bool(variant, 'pre_ln', v)),
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ResNetLA) -> Dict[str, torch.Tensor]:
    """Unwrap containers / wrapper prefixes; warm-start a stage-site model from a plain ResNet checkpoint
    (its attention-site keys are filled from the model's own init, so loading stays strict)."""
    return attention_shortcuts.RULES.filter(state_dict, model)


def _cfg(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(paper_name=AS_PAPER, **kwargs)


model_cfgs = {
    f'resnet{depth}_{kind}': as_arch(kind, depth)
    for depth in (50, 101) for kind in ('as_out', 'as_kv', 'as_stages')
}
model_cfgs.update(resnet50_half=as_arch('half'), resnet50_plain=as_arch('plain'))

default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in model_cfgs})

AS_FAMILY = register_family(Family(
    'attention_shortcuts', 'Attention shortcuts', card='attention_shortcuts', rules=attention_shortcuts.RULES,
    args=AS_ARGS), model_cfgs)


@register_model
def resnet50_as_out(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_out-Net-50 (common width 128, subsampled cache), ImageNet stem."""
    return build_model('resnet50_as_out', pretrained, **kwargs)


@register_model
def resnet50_as_kv(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_KV-Net-50 (widths 1/4 of ResNet-50, K/V cache adapters), ImageNet stem."""
    return build_model('resnet50_as_kv', pretrained, **kwargs)


@register_model
def resnet50_as_stages(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_stages-ResNet-50 (ResNet-50 with attention over earlier stage outputs between stages)."""
    return build_model('resnet50_as_stages', pretrained, **kwargs)


@register_model
def resnet101_as_out(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_out-Net-101 (depths 3-4-23-3; not in the paper), ImageNet stem."""
    return build_model('resnet101_as_out', pretrained, **kwargs)


@register_model
def resnet101_as_kv(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_KV-Net-101 (depths 3-4-23-3; not in the paper), ImageNet stem."""
    return build_model('resnet101_as_kv', pretrained, **kwargs)


@register_model
def resnet101_as_stages(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_stages-ResNet-101 (not in the paper)."""
    return build_model('resnet101_as_stages', pretrained, **kwargs)


@register_model
def resnet50_half(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 0.5x: block output widths halved (128/256/512/1024), inner widths kept (AS paper baseline)."""
    return build_model('resnet50_half', pretrained, **kwargs)


@register_model
def resnet50_plain(pretrained: bool = False, **kwargs) -> ResNetLA:
    """Plain ResNet-50: no skip connections at all (AS paper baseline)."""
    return build_model('resnet50_plain', pretrained, **kwargs)
