# Faster R-CNN, FPN, 1x schedule, COCO 2017: ResNet-101 with MRLA-base (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA): detection results and code exist for MRLA-L
# only (no MRLA-B detection backbone); this config applies the MRLA-L recipe, which is the stock 1x one:
# SGD lr 0.02 for total batch 16, momentum 0.9, weight decay 1e-4, 500-iter linear warm-up, 12 epochs,
# lr x0.1 after epochs 8 and 11; ImageNet-pretrained backbone, frozen_stages=1, norm_eval, no drop path.
#
# This config: that stock recipe (SGD lr 0.02 for total batch 16 = 8 GPUs x 2 images, momentum 0.9,
# weight decay 1e-4, 500-iter warm-up, steps at epochs 8 and 11) with auto_scale_lr enabled, so the lr
# follows the linear rule for the batch actually run (GPUs x train_dataloader.batch_size): e.g. 2 GPUs x
# 4 images -> 0.01. Backbone as in the official code: frozen_stages=1 (stem and stage 1, including their
# attention modules), norm_eval (every BatchNorm, the attention modules' too) and
# no drop path on the MRLA branch (as for MRLA-L; also the MRLA-B model default).
#
# Weights: the trunk starts from timm's ImageNet `resnet101c` weights, `resnet101c.gluon_in1k` (what
# `timm.create_model('resnet101c', pretrained=True)` loads, the plain ResNet with MRLA-B's deep stem),
# downloaded from the Hugging Face Hub on first use and cached there; the MRLA-B modules start freshly
# initialised (no layer-attention ImageNet weights are published). The weights are checked when the model is
# built, before any dataset. Offline, or from your own copy of a timm resnet101c state dict (.safetensors or
# torch file):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet101c.safetensors
# With layer-attention weights of `resnet101_mrlab` (.safetensors / torch file, official training checkpoints
# included, local-dir:DIR or hf-hub:ORG/NAME):
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = './faster-rcnn_r50-mrlab_fpn_1x_coco.py'

model = dict(backbone=dict(
    arch='resnet101_mrlab',
    init_cfg=dict(type='TimmTrunk', checkpoint='resnet101c.gluon_in1k')))
