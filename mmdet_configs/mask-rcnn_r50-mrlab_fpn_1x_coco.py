# Mask R-CNN, FPN, 1x schedule, COCO 2017: ResNet-50 with MRLA-base (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA): detection results and code exist for MRLA-L
# only (no MRLA-B detection backbone); this config applies the MRLA-L recipe, which is the stock 1x one:
# SGD lr 0.02 for total batch 16, momentum 0.9, weight decay 1e-4, 500-iter linear warm-up, 12 epochs,
# lr x0.1 after epochs 8 and 11; ImageNet-pretrained backbone, frozen_stages=1, norm_eval, no drop path.
#
# This config: the backbone and recipe of `_base_/layer_attn_backbone.py` (MMDetection's stock 1x schedule with
# auto_scale_lr, frozen_stages=1, norm_eval) with no drop path on the MRLA branch (as for MRLA-L; also the MRLA-B
# model default).
#
# Weights: the trunk starts from timm's ImageNet `resnet50c` weights, `resnet50c.gluon_in1k` (what
# `timm.create_model('resnet50c', pretrained=True)` loads, the plain ResNet with MRLA-B's deep stem); the MRLA-B
# modules start freshly initialised. Your own copy of the trunk, or layer-attention weights of `resnet50_mrlab`
# (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50c.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/layer_attn_backbone.py']

model = dict(backbone=dict(
    _base_.pop('layer_attn_backbone'),
    arch='resnet50_mrlab',
    drop_path_rate=0.0,
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet50c.gluon_in1k')))

auto_scale_lr = dict(enable=True, base_batch_size=16)
