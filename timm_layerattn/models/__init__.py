"""Model families; importing this package registers every model with timm."""
import pkgutil as _pkgutil
from typing import List as _List

from .resnet_la import *
from .cifar_resnet_la import *
from .resnet_as import *
from .cifar_resnet_as import *
from .cnntention import *
from .gradattn import *

# timm keys its registry by the last component of each family module's name.
MODEL_MODULES = tuple(m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith('_'))


def list_models(filter: str = '', include_tags: bool = False) -> _List[str]:
    """Names of the models this package registers (timm's `list_models` restricted to our modules)."""
    import timm
    return timm.list_models(filter or '', module=list(MODEL_MODULES), include_tags=include_tags)
