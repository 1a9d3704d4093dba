# RetinaNet, FPN, 1x schedule, COCO 2017: ResNet-101 with MRLA-light (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA, MMDetection 2.x,
# `configs/retinanet/retinanet_r50mrlal_fpn_1x_coco.py`): MMDetection's stock RetinaNet (FPN from stage 2 with
# extra convs on its input, 5 levels, 4-conv heads, focal loss, 9 anchors per location) with SGD lr 0.01 for
# total batch 16, momentum 0.9, weight decay 1e-4, 500-iter linear warm-up, 12 epochs, lr x0.1 after epochs 8
# and 11; ImageNet-pretrained backbone (official config: r50_mrlal_77.75.pth.tar), frozen_stages=1, norm_eval;
# no drop path on the MRLA branch.
#
# This config: `retinanet_r50-mrlal_fpn_1x_coco.py` (its recipe, backbone settings and drop path) with the
# ResNet-101 arch and trunk.
#
# Weights: the trunk starts from timm's ImageNet `resnet101` weights, `resnet101.a1h_in1k` (what
# `timm.create_model('resnet101', pretrained=True)` loads); the MRLA-L modules start freshly initialised. Your own
# copy of the trunk, or layer-attention weights of `resnet101_mrlal` (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './retinanet_r50-mrlal_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_mrlal',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101.a1h_in1k')))
