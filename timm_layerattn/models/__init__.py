"""Model families; importing this package registers every model with timm and with the family registry."""
from typing import List as _List

from .resnet_blocks import *
from .resnet_trunk import *
from .resnet_la import *
from .cifar_resnet_la import *
from .resnet_as import *
from .cifar_resnet_as import *
from .cnntention import *
from .gradattn import *
from ..families import families as _families

# timm keys its registry by the last component of each family module's name.
MODEL_MODULES = tuple(dict.fromkeys(m for f in _families() for m in f.modules))


def list_models(filter: str = '', include_tags: bool = False) -> _List[str]:
    """Names of the models this package registers (timm's `list_models` restricted to our modules)."""
    import timm
    return timm.list_models(filter or '', module=list(MODEL_MODULES), include_tags=include_tags)
