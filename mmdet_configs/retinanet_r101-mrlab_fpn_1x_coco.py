# RetinaNet, FPN, 1x schedule, COCO 2017: ResNet-101 with MRLA-base (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA): the only RetinaNet is MRLA-L's
# (`configs/retinanet/retinanet_r50mrlal_fpn_1x_coco.py`); this config applies its recipe: MMDetection's stock
# RetinaNet with SGD lr 0.01 for total batch 16, momentum 0.9, weight decay 1e-4, 500-iter linear warm-up,
# 12 epochs, lr x0.1 after epochs 8 and 11; ImageNet-pretrained backbone, frozen_stages=1, norm_eval, no drop
# path.
#
# This config: `retinanet_r50-mrlab_fpn_1x_coco.py` (its recipe, backbone settings and drop path) with the
# ResNet-101 arch and trunk.
#
# Weights: the trunk starts from timm's ImageNet `resnet101c` weights, `resnet101c.gluon_in1k` (what
# `timm.create_model('resnet101c', pretrained=True)` loads, the plain ResNet with MRLA-B's deep stem); the MRLA-B
# modules start freshly initialised. Your own copy of the trunk, or layer-attention weights of `resnet101_mrlab`
# (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101c.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './retinanet_r50-mrlab_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_mrlab',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101c.gluon_in1k')))
