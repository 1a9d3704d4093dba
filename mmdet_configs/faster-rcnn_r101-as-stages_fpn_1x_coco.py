# Faster R-CNN, FPN, 1x schedule, COCO 2017: ResNet-101 with attention shortcuts between stages (AS_stages).
#
# Paper (attention shortcuts): no detection experiments are reported; this config applies the recipe of
# the KCLA / MRLA configs next to it, i.e. the stock MMDetection 1x one.
#
# This config: that stock recipe (SGD lr 0.02 for total batch 16 = 8 GPUs x 2 images, momentum 0.9,
# weight decay 1e-4, 500-iter warm-up, steps at epochs 8 and 11) with auto_scale_lr enabled, so the lr
# follows the linear rule for the batch actually run (GPUs x train_dataloader.batch_size): e.g. 2 GPUs x
# 4 images -> 0.01. Backbone: frozen_stages=1 (stem and stage 1, including their attention modules),
# norm_eval (every BatchNorm) and no drop path.
#
# Weights: the trunk starts from timm's ImageNet `resnet101` weights, `resnet101.a1h_in1k` (what
# `timm.create_model('resnet101', pretrained=True)` loads), downloaded from the Hugging Face Hub on first use
# and cached there; the attention-shortcut modules start freshly initialised (no layer-attention ImageNet
# weights are published). The weights are checked when the model is built, before any dataset. Offline, or
# from your own copy of a timm / torchvision resnet101 state dict (.safetensors or torch file):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101.safetensors
# With layer-attention weights of `resnet101_as_stages` (.safetensors / torch file, local-dir:DIR or
# hf-hub:ORG/NAME):
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './faster-rcnn_r101-mrlal_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        arch='resnet101_as_stages',
        drop_path_rate=0.0,
        init_cfg=dict(type='TimmTrunk', checkpoint='resnet101.a1h_in1k')))
