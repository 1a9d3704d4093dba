# RetinaNet, FPN, 1x schedule, COCO 2017: ResNet-50 with MRLA-base (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA): the only RetinaNet is MRLA-L's
# (`configs/retinanet/retinanet_r50mrlal_fpn_1x_coco.py`); this config applies its recipe: MMDetection's stock
# RetinaNet with SGD lr 0.01 for total batch 16, momentum 0.9, weight decay 1e-4, 500-iter linear warm-up,
# 12 epochs, lr x0.1 after epochs 8 and 11; ImageNet-pretrained backbone, frozen_stages=1, norm_eval, no drop
# path.
#
# This config: MMDetection's stock RetinaNet 1x config (that detector, lr 0.01 for batch 16) with the
# backbone of `_base_/layer_attn_backbone.py` (auto_scale_lr, frozen_stages=1, norm_eval) with no drop path
# on the MRLA branch (as for MRLA-L; also the MRLA-B model default).
#
# Weights: the trunk starts from timm's ImageNet `resnet50c` weights, `resnet50c.gluon_in1k` (what
# `timm.create_model('resnet50c', pretrained=True)` loads, the plain ResNet with MRLA-B's deep stem); the MRLA-B
# modules start freshly initialised. Your own copy of the trunk, or layer-attention weights of `resnet50_mrlab`
# (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50c.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/layer_attn_backbone.py']

model = dict(backbone=dict(
    _base_.pop('layer_attn_backbone'),
    arch='resnet50_mrlab',
    drop_path_rate=0.0,
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet50c.gluon_in1k')))

auto_scale_lr = dict(enable=True, base_batch_size=16)
