"""timm-layerattn: layer-attention ResNets (KCLA, MRLA, ...) as native timm models.

`import timm_layerattn` registers every model with timm; then use `timm.create_model(...)` as usual.
Optional integrations (MMDetection in `timm_layerattn.det`, Hub upload) are imported lazily.
"""
from .version import __version__
from . import models
from .layers import LayerAttnCfg
from .models.resnet_trunk import ResNetLA, ResNetLACfg
from .pretrained import (
    CheckpointError, CheckpointMismatchError, CheckpointNotCachedError, CheckpointNotFoundError,
    PretrainedWeightsError, register_pretrained, unregister_pretrained)

# Imported on first use (keeps `import timm_layerattn` light): name -> submodule.
_LAZY = {
    'convert_official': 'convert',
    'load_trunk': 'convert',
    'export_folder': 'hub',
    'push_folder': 'hub',
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
