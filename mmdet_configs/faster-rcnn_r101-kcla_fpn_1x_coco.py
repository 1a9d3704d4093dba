# Faster R-CNN, FPN, 1x schedule, COCO 2017: ResNet-101 with KCLA (Key-Correlated Layer Attention).
#
# Paper (KCLA, Sec. V-B): ImageNet-pretrained backbone, SGD momentum 0.9, 1x schedule (12 epochs, lr x0.1
# after epochs 8 and 11), 2 GPUs, total batch 4, initial lr written as 0.05 "by the linear scaling rule".
# That rule applied to MMDetection's 0.02 @ batch 16 gives 0.005 @ batch 4, a tenth of the written value;
# the official repo ships no working R101 KCLA config (its R101 files build a plain ResNet).
#
# This config: that stock recipe (SGD lr 0.02 for total batch 16 = 8 GPUs x 2 images, momentum 0.9,
# weight decay 1e-4, 500-iter warm-up, steps at epochs 8 and 11) with auto_scale_lr enabled, so the lr
# follows the linear rule for the batch actually run (GPUs x train_dataloader.batch_size): e.g. 2 GPUs x
# 4 images -> 0.01. Backbone as in the official code: frozen_stages=1 (stem and stage 1, including their
# attention modules), norm_eval (every BatchNorm, the attention modules' too) and
# drop path 0.2 on the KCLA branch (hard-coded in the official cell; the ImageNet weights were trained so).
#
# Weights: the trunk starts from timm's ImageNet `resnet101` weights, `resnet101.a1h_in1k` (what
# `timm.create_model('resnet101', pretrained=True)` loads), downloaded from the Hugging Face Hub on first use
# and cached there; the KCLA modules start freshly initialised (no layer-attention ImageNet weights are
# published). The weights are checked when the model is built, before any dataset. Offline, or from your own
# copy of a timm / torchvision resnet101 state dict (.safetensors or torch file):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101.safetensors
# With layer-attention weights of `resnet101_kcla` (.safetensors / torch file, official training checkpoints
# included, local-dir:DIR or hf-hub:ORG/NAME):
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './faster-rcnn_r50-kcla_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_kcla',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101.a1h_in1k')))
