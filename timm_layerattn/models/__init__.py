"""Model families; importing this package registers every model with timm."""
from .resnet_la import *
from .cifar_resnet_la import *
