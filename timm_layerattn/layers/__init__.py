"""Layer-attention building blocks (plain modules, no registry)."""
from ._common import ChannelConv1d, LayerAttnBase, eca_kernel_size
from .factory import LAYER_ATTN_TYPES, LayerAttnCfg, create_layer_attn
from .kcla import KCLA, kcla_temperatures
from .mrla import MRLABase, MRLALight
from .gates import DIACell, DIAGate, EcaGate, SEGate, dia_cell_step
from .dynamic_la import DynamicLABase, DynamicLALight, DynamicSharingUnit
from .full_la import FullLACfg, FullLayerAttn
from .rla import RLAConcat, RLANeck, RLAStageConvs, RLAUpdate
