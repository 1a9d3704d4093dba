# Mask R-CNN, FPN, 1x schedule, COCO 2017: ResNet-101 with KCLA (Key-Correlated Layer Attention).
#
# Paper (KCLA, Sec. V-B): ImageNet-pretrained backbone, SGD momentum 0.9, 1x schedule (12 epochs, lr x0.1
# after epochs 8 and 11), 2 GPUs, total batch 4, initial lr written as 0.05 "by the linear scaling rule".
# That rule applied to MMDetection's 0.02 @ batch 16 gives 0.005 @ batch 4, a tenth of the written value;
# the official repo ships no working R101 KCLA config (its R101 files build a plain ResNet).
#
# This config: `mask-rcnn_r50-kcla_fpn_1x_coco.py` (its recipe, backbone settings and drop path) with the
# ResNet-101 arch and trunk.
#
# Weights: the trunk starts from timm's ImageNet `resnet101` weights, `resnet101.a1h_in1k` (what
# `timm.create_model('resnet101', pretrained=True)` loads); the KCLA modules start freshly initialised. Your own
# copy of the trunk, or layer-attention weights of `resnet101_kcla` (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './mask-rcnn_r50-kcla_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_kcla',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101.a1h_in1k')))
