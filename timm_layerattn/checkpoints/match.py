"""The strict check of a state dict against a model's, and the hints that say what to do instead.

`match_keys(state_dict, expected)` lists the missing keys, the unexpected keys and the shape mismatches;
`mismatch_parts` / `check_state_dict` word them as one line (a few keys of each kind, the rest counted).
Every reader of checkpoints (the converter, the model export, timm's entry points, the MMDetection backbone)
checks with these before loading anything, so a checkpoint that does not fit never half-loads.

`fit_hints` explains a mismatch: which family and depth the checkpoint holds (from its key names, with the
registered families' `rules.native_kind`), which registered architecture it fits (`suggest_arch`, from the
family registry `timm_layerattn.families`), what the family's rules say (`rules.hints`, e.g. a KCLA head dim
that differs), a classifier size that differs, and `load_trunk` for plain ResNet weights.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .._utils.errors import UserError
from ..families import families
from .rules import registered_rules

__all__ = [
    'KINDS', 'KeyMatch', 'match_keys', 'mismatch_parts', 'check_state_dict', 'blocks_per_stage', 'block_type',
    'checkpoint_kind', 'Layout', 'layout_of', 'layer_attn', 'model_kind', 'registered_archs', 'suggest_arch',
    'fit_hints',
]

# The kinds of mismatch, in the order they are reported.
KINDS = ('unexpected', 'missing', 'shape')
_SHOW = 3


def _shape(value: Any) -> Tuple[int, ...]:
    return tuple(getattr(value, 'shape', ()))


@dataclass(frozen=True)
class KeyMatch:
    """How a state dict fits an expected one: keys only one side has, and keys whose shapes differ.

    Attributes:
        unexpected: Keys of the state dict the model lacks (state dict order).
        missing: Keys of the model the state dict lacks (model order).
        mismatched: Keys of both with different shapes (state dict order).
        shapes: `key -> (checkpoint shape, model shape)` of every mismatched key.
    """
    unexpected: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched)

    def parts(self, source_names: Optional[Mapping[str, str]] = None, kinds: Sequence[str] = KINDS) -> List[str]:
        """One phrase per kind of mismatch in `kinds`, naming a few keys and counting the rest.

        `source_names` maps converted keys back to the checkpoint's own names, which the phrases then show.
        """
        src = source_names or {}

        def name(k: str) -> str:
            return f'{src[k]} (-> {k})' if k in src and src[k] != k else k

        def some(items: List[str]) -> str:
            return ', '.join(items[:_SHOW]) + (f', ... ({len(items) - _SHOW} more)' if len(items) > _SHOW else '')

        parts = []
        if 'unexpected' in kinds and self.unexpected:
            parts.append(f'{len(self.unexpected)} unexpected key(s): ' + some([name(k) for k in self.unexpected]))
        if 'missing' in kinds and self.missing:
            parts.append(f'{len(self.missing)} missing key(s): ' + some(self.missing))
        if 'shape' in kinds and self.mismatched:
            parts.append(f'{len(self.mismatched)} shape mismatch(es): ' + some(
                [f'{name(k)} checkpoint {list(self.shapes[k][0])} vs model {list(self.shapes[k][1])}'
                 for k in self.mismatched]))
        return parts


def match_keys(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> KeyMatch:
    """Compare `state_dict` with `expected` (a model's state dict; meta tensors are fine) by keys and shapes."""
    mismatched = [k for k in state_dict if k in expected and _shape(state_dict[k]) != _shape(expected[k])]
    return KeyMatch(
        unexpected=[k for k in state_dict if k not in expected],
        missing=[k for k in expected if k not in state_dict],
        mismatched=mismatched,
        shapes={k: (_shape(state_dict[k]), _shape(expected[k])) for k in mismatched},
    )


def mismatch_parts(
        state_dict: Mapping[str, Any],
        expected: Mapping[str, Any],
        source_names: Optional[Mapping[str, str]] = None,
        kinds: Tuple[str, ...] = KINDS,
) -> List[str]:
    """How `state_dict` does not fit `expected`, one phrase per kind (see `KeyMatch.parts`)."""
    return match_keys(state_dict, expected).parts(source_names, kinds)


def check_state_dict(
        state_dict: Mapping[str, Any],
        expected: Mapping[str, Any],
        what: str = 'the model',
        source_names: Optional[Mapping[str, str]] = None,
) -> None:
    """Raise one `UserError` line if `state_dict` does not fit `expected` (see `mismatch_parts`)."""
    parts = mismatch_parts(state_dict, expected, source_names)
    if parts:
        raise UserError(f'checkpoint does not fit {what}: ' + '; '.join(parts))


# ---------------------------------------------------------------------------------------------------------------
# What a state dict holds, what a registered architecture is
# ---------------------------------------------------------------------------------------------------------------

def blocks_per_stage(keys: Iterable[str]) -> Tuple[int, ...]:
    """Blocks per stage of a state dict in the skeleton's layout (`layerS.i.*` keys), () if none."""
    blocks: Dict[int, set] = {}
    for k in keys:
        m = re.match(r'^layer(\d+)\.(\d+)\.', k) if isinstance(k, str) else None
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(blocks[s]) for s in sorted(blocks))


def block_type(keys: Iterable[str]) -> Optional[str]:
    """'bottleneck' (a block has `conv3`), 'basic' (blocks end at `conv2`) or None (no block keys)."""
    convs = {m.group(1) for k in keys if isinstance(k, str)
             for m in [re.match(r'^layer\d+\.\d+\.conv(\d)\.', k)] if m}
    if '3' in convs:
        return 'bottleneck'
    return 'basic' if '2' in convs else None


def checkpoint_kind(keys: Sequence[str]) -> str:
    """The layer-interaction kind a state dict in this package's layout holds, from its key names: an attention
    type ('kcla', 'mrla_light', 'mrla_base'), 'CNNtention <variant>', 'attention-shortcut', 'gradattn', or
    'plain' when no family's keys are there.

    Asks each registered family's `rules.native_kind`, in registration order (the families' key patterns are
    disjoint except KCLA's `attn.v`, which the layer-attention rules tell apart themselves).
    """
    keys = list(keys)
    for rules in registered_rules():
        kind = rules.native_kind(keys)
        if kind is not None:
            return kind
    return 'plain'


@dataclass(frozen=True)
class Layout:
    """What a state dict in the skeleton's layout tells about its architecture (None: cannot tell).

    Attributes:
        kind: `checkpoint_kind`.
        layers: Blocks per stage.
        block: 'bottleneck' or 'basic'.
        widths: Block output width per stage (the last conv of each stage's first block).
        projections: True with projection shortcuts (`downsample` keys), False without any.
    """
    kind: str
    layers: Tuple[int, ...]
    block: Optional[str] = None
    widths: Optional[Tuple[int, ...]] = None
    projections: Optional[bool] = None


def layout_of(state_dict: Mapping[str, Any]) -> Layout:
    """The `Layout` of a state dict in the skeleton's layout (this package's, timm's / torchvision's)."""
    keys = [k for k in state_dict if isinstance(k, str)]
    layers, block = blocks_per_stage(keys), block_type(keys)
    widths = None
    if layers and block is not None:
        last = 'conv3' if block == 'bottleneck' else 'conv2'
        found = [_shape(state_dict.get(f'layer{s}.0.{last}.weight')) for s in range(1, len(layers) + 1)]
        widths = tuple(shape[0] for shape in found) if all(found) else None
    projections = any(re.match(r'^layer\d+\.\d+\.downsample\.', k) for k in keys) if layers else None
    return Layout(checkpoint_kind(keys), layers, block, widths, projections)


def _cfg_widths(cfg: Any) -> Optional[Tuple[int, ...]]:
    """Block output width per stage of an architecture config, None if it does not say."""
    out = getattr(cfg, 'out_channels', None)
    if out is not None:
        return tuple(out)
    channels, block = getattr(cfg, 'channels', None), getattr(cfg, 'block', None)
    if channels is None or block not in ('bottleneck', 'basic'):
        return None
    expansion = getattr(cfg, 'expansion', None) or (4 if block == 'bottleneck' else 1)
    return tuple(c * expansion for c in channels)


def layer_attn(cfg: Any) -> Optional[Any]:
    """The layer attention (`LayerAttnCfg`-like, with `.type` / `.head_dim`) of an architecture config, None
    without: the config's own `attn`, or its strategy's."""
    attn = getattr(cfg, 'attn', None)
    if attn is None:
        attn = getattr(getattr(cfg, 'strategy', None), 'attn', None)
    return attn if hasattr(attn, 'type') else None


def model_kind(cfg: Any) -> Optional[str]:
    """The `checkpoint_kind` of an architecture's state dict, when its config tells it: the layer-attention
    type, 'plain' for a bare ResNet, None for other strategies (told apart by their keys only)."""
    attn = layer_attn(cfg)
    if attn is not None:
        return attn.type
    if any(getattr(cfg, name, None) is not None for name in ('strategy', 'shortcut', 'stage_post', 'neck')):
        return None
    return 'plain'


def registered_archs() -> Dict[str, Any]:
    """Every architecture of the family registry, `name -> config`, in registration order."""
    out: Dict[str, Any] = {}
    for family in families():
        out.update(family.models)
    return out


def suggest_arch(
        layout: Layout,
        stem_type: Optional[str],
        candidates: Optional[Mapping[str, Any]] = None,
) -> Optional[str]:
    """The first architecture whose state dict has `layout` (kind and blocks per stage; block type, widths and
    shortcut projections where both sides tell) and whose stem is `stem_type`; None if there is none.

    Args:
        candidates: `name -> config` to search; the family registry (`registered_archs`) by default.
    """
    candidates = registered_archs() if candidates is None else candidates

    def agree(a: Any, b: Any) -> bool:
        return a is None or b is None or a == b

    for name, cfg in candidates.items():
        residual = getattr(cfg, 'residual', None)
        if model_kind(cfg) == layout.kind and tuple(getattr(cfg, 'layers', ())) == tuple(layout.layers) \
                and getattr(cfg, 'stem_type', None) == stem_type and agree(getattr(cfg, 'block', None), layout.block) \
                and agree(_cfg_widths(cfg), layout.widths) \
                and agree(None if residual is None else residual == 'proj', layout.projections):
            return name
    return None


def fit_hints(
        state_dict: Mapping[str, Any],
        expected: Mapping[str, Any],
        *,
        arch: str,
        model_cfg: Any = None,
        classifier: str = 'fc',
        declared_classes: Optional[int] = None,
        candidates: Optional[Mapping[str, Any]] = None,
) -> List[str]:
    """What to do about a checkpoint that does not fit `arch` (for timm's entry points, which can declare the
    checkpoint's classes and build another head or head dim).

    Args:
        state_dict: The checkpoint (after the family's filter).
        expected: The model's state dict.
        arch: The architecture's name, for messages.
        model_cfg: The model's architecture config (`model.cfg`: stem, layer attention), if any.
        classifier: The classifier module's name.
        declared_classes: The classes the pretrained config declares for the checkpoint.
        candidates: Architectures to suggest from, `name -> config` (the family registry by default).
    """
    hints = []
    layout = layout_of(state_dict)
    kind, model_kind_ = layout.kind, checkpoint_kind(list(expected))
    blocks, model_blocks = layout.layers, blocks_per_stage(expected)
    other_depth = bool(blocks) and blocks != model_blocks
    if kind != model_kind_ or other_depth:
        hint = f'the checkpoint holds {kind} weights'
        if other_depth:
            hint += f' with {"-".join(map(str, blocks))} blocks per stage'
        hint += f", '{arch}' is {model_kind_}"
        if other_depth:
            hint += f' with {"-".join(map(str, model_blocks))}'
        stem = getattr(model_cfg, 'stem_type', None)
        suggestion = None
        if stem is not None and blocks:
            suggestion = suggest_arch(layout, stem, candidates=candidates)
        if suggestion and suggestion != arch:
            hint += f"; create '{suggestion}' instead"
        if kind == 'plain' and model_kind_ != 'plain':
            hint += ('; to start from plain ResNet weights (e.g. timm\'s), create the model with pretrained=False '
                     'and call timm_layerattn.load_trunk(model, path)')
        hints.append(hint)
    else:
        for rules in registered_rules():  # the family's own hints (e.g. a KCLA head dim that differs)
            hints.extend(rules.hints(state_dict, model_cfg))
    key = classifier + '.weight'
    weight = state_dict.get(key)
    if key in expected and weight is not None and getattr(weight, 'ndim', 0) == 2 \
            and _shape(weight)[:1] != _shape(expected[key])[:1]:
        n, m = weight.shape[0], expected[key].shape[0]
        hints.append(
            f"the checkpoint's classifier has {n} classes, the model {m} (the pretrained cfg says "
            f"{declared_classes}): declare the checkpoint's with pretrained_cfg_overlay=dict(..., "
            f"num_classes={n}) and pass num_classes={m} for a new {m}-class head")
    return hints
