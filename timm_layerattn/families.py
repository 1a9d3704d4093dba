"""The family registry: one place that says which models exist, what family each belongs to and how it is
handled around the model (Hub card, official checkpoint layout, accepted kwargs, pretrained config).

Every family module (in `models/`) declares a `Family` and registers its variants with `register_family`; the converter,
the Hub card writer, the MMDetection backbone and the CLI ask `family_of(name)` instead of matching model
names. The module knows no model class and imports no family.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    'Family', 'register_family', 'family_of', 'find_family', 'families', 'pretrained_cfg', 'imagenet_cfg',
    'cifar_cfg', 'reject_kwargs',
]

FilterFn = Callable[[Dict[str, Any], Any], Dict[str, Any]]
DetectFn = Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Family:
    """How one family of architectures is handled around the model.

    Attributes:
        name: Family id, also the `family` of `timm-layerattn convert` reports ('kcla', 'mrla_light', ...).
        title: Human name for messages and cards.
        card: Model-card template `hub_cards/<card>.md`.
        filter_fn: The family's `checkpoint_filter_fn(state_dict, model)`: official layouts -> ours.
        detect_official: True when a state dict is in the family's official (research code) layout.
        model_kwargs: Model kwargs beyond timm's that the family's entrypoints accept.
        attention: The layer-attention type of the family's models (`LayerAttnCfg.type`), `None` without.
        modules: Model modules that register the family's variants (timm's `list_models(module=...)`).
    """
    name: str
    title: str
    card: str
    filter_fn: Optional[FilterFn] = None
    detect_official: Optional[DetectFn] = None
    model_kwargs: Tuple[str, ...] = ()
    attention: Optional[str] = None
    modules: Tuple[str, ...] = ()
    models: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_FAMILIES: Dict[str, Family] = {}
_MODEL_FAMILY: Dict[str, str] = {}


def register_family(family: Family, model_cfgs: Mapping[str, Any]) -> Family:
    """Register `family` (once) and attach its variants `name -> architecture config`.

    A family may be declared by several modules (ImageNet and CIFAR variants); the first declaration wins
    and later ones only add models. A model name belongs to exactly one family.
    """
    known = _FAMILIES.setdefault(family.name, family)
    for name, cfg in model_cfgs.items():
        owner = _MODEL_FAMILY.get(name)
        if owner is not None and owner != family.name:
            raise ValueError(f'model {name!r} is already registered to family {owner!r}')
        _MODEL_FAMILY[name] = family.name
        known.models[name] = cfg
    return known


def find_family(model_name: str) -> Optional[Family]:
    """The family of a registered architecture (a pretrained tag after '.' is ignored), `None` if unknown."""
    arch = model_name.split('.', 1)[0]
    name = _MODEL_FAMILY.get(arch)
    return _FAMILIES[name] if name is not None else None


def family_of(model_name: str) -> Family:
    """Like `find_family`, but an unknown name is a `KeyError` that says where to look."""
    family = find_family(model_name)
    if family is None:
        raise KeyError(f"'{model_name.split('.', 1)[0]}' is not one of timm_layerattn's architectures; "
                       f"see `timm-layerattn list`")
    return family


def families() -> List[Family]:
    """Every registered family, in registration order."""
    return list(_FAMILIES.values())


def pretrained_cfg(**kwargs: Any) -> Dict[str, Any]:
    """A timm pretrained config with this package's common fields (classifier `fc`, stem `conv1`)."""
    return {
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', **kwargs,
    }


def imagenet_cfg(**kwargs: Any) -> Dict[str, Any]:
    """Pretrained config of a 224 px ImageNet model."""
    return pretrained_cfg(**{
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, **kwargs})


def cifar_cfg(mean: Tuple[float, ...], std: Tuple[float, ...], **kwargs: Any) -> Dict[str, Any]:
    """Pretrained config of a 32 px CIFAR model (any input of at least 8 px works)."""
    return pretrained_cfg(**{
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'min_input_size': (3, 8, 8),
        'crop_pct': 1.0, 'mean': mean, 'std': std, **kwargs})


def reject_kwargs(variant: str, given: Mapping[str, Any], accepted: Iterable[str]) -> Dict[str, Any]:
    """The family kwargs that were given (not `None`); one that `variant` does not take is a `TypeError`,
    as Python reports an unexpected keyword argument."""
    accepted = set(accepted)
    out = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in accepted:
            raise TypeError(f'{variant} does not take {name!r}')
        out[name] = value
    return out
