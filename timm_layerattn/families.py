"""The family registry: one place that says which models exist, what family each belongs to and how it is
handled around the model (Hub card, checkpoint rules, the model kwargs it accepts, pretrained config).

Every family module (in `models/`) declares a `Family` once and registers its variants with
`register_family`; the model builder, the converter, the Hub card writer, the MMDetection backbone and the
CLI ask `family_of(name)` instead of matching model names. The module knows no model class and imports no
family.
"""
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    'Family', 'ModelArg', 'register_family', 'family_of', 'find_family', 'families', 'apply_model_args',
    'pretrained_cfg', 'imagenet_cfg', 'cifar_cfg',
]


@dataclass(frozen=True)
class ModelArg:
    """A model kwarg beyond timm's that a family's entrypoints accept, stated once.

    Attributes:
        name: The kwarg, as users pass it to `timm.create_model`.
        path: Where the value goes in the architecture config, a dotted field path through nested frozen
            dataclasses ('strategy.attn.head_dim'); `None` when `apply` computes the change.
        check: `(variant, value, arch) -> None`, raising a one-line `ValueError` / `TypeError` that names the
            kwarg; run before the value is applied (the architecture's own checks run at construction).
        takes: `arch -> bool`, which of the family's architectures take the kwarg (all when `None`); for any
            other, passing it is a `TypeError` as Python reports an unexpected keyword argument.
        apply: `(arch, value) -> arch` for a kwarg that changes more than one field.
    """
    name: str
    path: Optional[str] = None
    check: Optional[Callable[[str, Any, Any], None]] = None
    takes: Optional[Callable[[Any], bool]] = None
    apply: Optional[Callable[[Any, Any], Any]] = None


def _replace_path(obj: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition('.')
    return replace(obj, **{head: _replace_path(getattr(obj, head), rest, value) if rest else value})


@dataclass(frozen=True)
class Family:
    """How one family of architectures is handled around the model.

    Attributes:
        name: Family id, also the `family` of `timm-layerattn convert` reports ('kcla', 'mrla_light', ...).
        title: Human name for messages and cards.
        card: Model-card template `hub_cards/<card>.md`.
        rules: The family's `CheckpointRules` (official layout detection, renaming, checks); `None`: none.
        args: The model kwargs beyond timm's that the family's entrypoints accept, in the order they apply.
        modules: Model modules that register the family's variants (timm's `list_models(module=...)`),
            filled in by `register_family` from its callers.
        models: Variant name -> architecture config, filled in by `register_family`.
    """
    name: str
    title: str
    card: str
    rules: Any = None
    args: Tuple[ModelArg, ...] = ()
    modules: List[str] = field(default_factory=list, compare=False, repr=False)
    models: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_FAMILIES: Dict[str, Family] = {}
_MODEL_FAMILY: Dict[str, str] = {}


def register_family(family: Family, model_cfgs: Mapping[str, Any], module: Optional[str] = None) -> Family:
    """Register `family` (once) and attach its variants `name -> architecture config`.

    A family may be declared by several modules (ImageNet and CIFAR variants); the first declaration wins
    and later ones only add models. A model name belongs to exactly one family. `module` is the registering
    model module (timm keys its registry by the last component of its name): the caller's by default.
    """
    if module is None:
        module = sys._getframe(1).f_globals['__name__']
    known = _FAMILIES.setdefault(family.name, family)
    for name, cfg in model_cfgs.items():
        owner = _MODEL_FAMILY.get(name)
        if owner is not None and owner != family.name:
            raise ValueError(f'model {name!r} is already registered to family {owner!r}')
        _MODEL_FAMILY[name] = family.name
        known.models[name] = cfg
    short = module.rsplit('.', 1)[-1]
    if model_cfgs and short not in known.modules:
        known.modules.append(short)
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


def apply_model_args(variant: str, arch: Any, kwargs: Dict[str, Any]) -> Any:
    """Fold the family kwargs of `variant` out of `kwargs` (removed from it) into its architecture `arch`.

    A kwarg given as `None` means the default. One that the variant does not take is a `TypeError`; each
    value is checked (`ModelArg.check`) before it is applied, in the family's order.
    """
    for arg in family_of(variant).args:
        value = kwargs.pop(arg.name, None)
        if value is None:
            continue
        if arg.takes is not None and not arg.takes(arch):
            raise TypeError(f'{variant} does not take {arg.name!r}')
        if arg.check is not None:
            arg.check(variant, value, arch)
        arch = arg.apply(arch, value) if arg.apply is not None else _replace_path(arch, arg.path or arg.name, value)
    return arch


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
