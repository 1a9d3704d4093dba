# Mask R-CNN, FPN, 1x schedule, COCO 2017: ResNet-101 with attention shortcuts between stages (AS_stages).
#
# Paper (attention shortcuts): no detection experiments are reported; this config applies the recipe of
# the KCLA / MRLA configs next to it, i.e. the stock MMDetection 1x one.
#
# This config: `mask-rcnn_r50-as-stages_fpn_1x_coco.py` (its recipe, backbone settings and drop path) with the
# ResNet-101 arch and trunk.
#
# Weights: the trunk starts from timm's ImageNet `resnet101` weights, `resnet101.a1h_in1k` (what
# `timm.create_model('resnet101', pretrained=True)` loads); the attention-shortcut modules start freshly
# initialised. Your own copy of the trunk, or layer-attention weights of `resnet101_as_stages` (see
# `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './mask-rcnn_r50-as-stages_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_as_stages',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101.a1h_in1k')))
