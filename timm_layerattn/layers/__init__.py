"""Layer-attention building blocks (plain modules, no registry)."""
from ._common import ChannelConv1d, LayerAttnBase, eca_kernel_size
from .factory import LAYER_ATTN_TYPES, LayerAttnCfg, create_layer_attn
from .kcla import KCLA, kcla_temperatures
from .mrla import MRLABase, MRLALight
