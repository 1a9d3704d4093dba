"""timm-layerattn: layer-attention ResNets (KCLA, MRLA, ...) as native timm models.

`import timm_layerattn` registers every model with timm; then use `timm.create_model(...)` as usual.
Optional integrations (MMDetection in `timm_layerattn.det`, Hub upload) are imported lazily.
"""
from .version import __version__
from . import models
from .layers import LayerAttnCfg
from .models.resnet_la import ResNetLA, ResNetLACfg
