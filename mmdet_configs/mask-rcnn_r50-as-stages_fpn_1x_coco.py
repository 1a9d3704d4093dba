# Mask R-CNN, FPN, 1x schedule, COCO 2017: ResNet-50 with attention shortcuts between stages (AS_stages).
#
# Paper (attention shortcuts): no detection experiments are reported; this config applies the recipe of
# the KCLA / MRLA configs next to it, i.e. the stock MMDetection 1x one.
#
# This config: the backbone and recipe of `_base_/layer_attn_backbone.py` (MMDetection's stock 1x schedule with
# auto_scale_lr, frozen_stages=1, norm_eval) with no drop path.
#
# Weights: the trunk starts from timm's ImageNet `resnet50` weights, `resnet50.a1_in1k` (what
# `timm.create_model('resnet50', pretrained=True)` loads); the attention-shortcut modules start freshly
# initialised. Your own copy of the trunk, or layer-attention weights of `resnet50_as_stages` (see
# `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/layer_attn_backbone.py']

model = dict(backbone=dict(
    _base_.pop('layer_attn_backbone'),
    arch='resnet50_as_stages',
    drop_path_rate=0.0,
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k')))

auto_scale_lr = dict(enable=True, base_batch_size=16)
