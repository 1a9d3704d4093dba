# RetinaNet, FPN, 1x schedule, COCO 2017: ResNet-50 with MRLA-light (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA, MMDetection 2.x,
# `configs/retinanet/retinanet_r50mrlal_fpn_1x_coco.py`): MMDetection's stock RetinaNet (FPN from stage 2 with
# extra convs on its input, 5 levels, 4-conv heads, focal loss, 9 anchors per location) with SGD lr 0.01 for
# total batch 16, momentum 0.9, weight decay 1e-4, 500-iter linear warm-up, 12 epochs, lr x0.1 after epochs 8
# and 11; ImageNet-pretrained backbone (official config: r50_mrlal_77.75.pth.tar), frozen_stages=1, norm_eval;
# no drop path on the MRLA branch.
#
# This config: MMDetection's stock RetinaNet 1x config (that detector, lr 0.01 for batch 16) with the
# backbone of `_base_/layer_attn_backbone.py` (auto_scale_lr, frozen_stages=1, norm_eval) with no drop path
# on the MRLA branch (the official MRLA-L detection backbone has none).
#
# Weights: the trunk starts from timm's ImageNet `resnet50` weights, `resnet50.a1_in1k` (what
# `timm.create_model('resnet50', pretrained=True)` loads); the MRLA-L modules start freshly initialised. Your own
# copy of the trunk, or layer-attention weights of `resnet50_mrlal` (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/layer_attn_backbone.py']

model = dict(backbone=dict(
    _base_.pop('layer_attn_backbone'),
    arch='resnet50_mrlal',
    drop_path_rate=0.0,
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k')))

auto_scale_lr = dict(enable=True, base_batch_size=16)
