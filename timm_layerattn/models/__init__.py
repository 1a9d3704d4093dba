"""Model families; importing this package registers every model with timm and with the family registry."""
from typing import List as _List, Tuple as _Tuple

from .resnet_blocks import *
from .resnet_trunk import *
from .resnet_la import *
from .cifar_resnet_la import *
from .resnet_as import *
from .cifar_resnet_as import *
from .cnntention import *
from .gradattn import *
from .efficientnet_la import *
from .deit_la import *
from .cifar_resnet_gates import *
from .resnet_dynamic_la import *
from .resnet_full_la import *
from .resnet_rla import *
from ..families import families as _families



def model_modules() -> _Tuple[str, ...]:
    """The modules that register the families' models, as timm keys them (the last component of each module's
    name). Read from the registry at call time, so a family registered later is included."""
    return tuple(dict.fromkeys(m for f in _families() for m in f.modules))


def __getattr__(name: str):
    if name == 'MODEL_MODULES':  # the same, as a module attribute
        return model_modules()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def list_models(filter: str = '', include_tags: bool = False) -> _List[str]:
    """Names of the models this package registers (timm's `list_models` restricted to our modules)."""
    import timm
    return timm.list_models(filter or '', module=list(model_modules()), include_tags=include_tags)
