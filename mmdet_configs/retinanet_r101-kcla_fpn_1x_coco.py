# RetinaNet, FPN, 1x schedule, COCO 2017: ResNet-101 with KCLA (Key-Correlated Layer Attention).
#
# Paper (KCLA, Sec. V-B): detection with Faster / Mask R-CNN only, no RetinaNet. This config applies MRLA's
# RetinaNet recipe (joyfang1106/MRLA, `configs/retinanet/retinanet_r50mrlal_fpn_1x_coco.py`), which is
# MMDetection's stock RetinaNet with SGD lr 0.01 for total batch 16, momentum 0.9, weight decay 1e-4, 500-iter
# linear warm-up, 12 epochs, lr x0.1 after epochs 8 and 11; ImageNet-pretrained backbone, frozen_stages=1,
# norm_eval.
#
# This config: `retinanet_r50-kcla_fpn_1x_coco.py` (its recipe, backbone settings and drop path) with the
# ResNet-101 arch and trunk.
#
# Weights: the trunk starts from timm's ImageNet `resnet101` weights, `resnet101.a1h_in1k` (what
# `timm.create_model('resnet101', pretrained=True)` loads); the KCLA modules start freshly initialised. Your own
# copy of the trunk, or layer-attention weights of `resnet101_kcla` (see `_base_/layer_attn_backbone.py`):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101.safetensors
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './retinanet_r50-kcla_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_kcla',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101.a1h_in1k')))
