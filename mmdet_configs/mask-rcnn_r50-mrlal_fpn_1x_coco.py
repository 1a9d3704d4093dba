# Mask R-CNN, FPN, 1x schedule, COCO 2017: ResNet-50 with MRLA-light (Multi-head Recurrent Layer Attention).
#
# Paper / official repo (MRLA, ICLR 2023; joyfang1106/MRLA, MMDetection 2.x): the stock 1x recipe, i.e.
# SGD lr 0.02 for total batch 16 (README: 2 GPUs x 8 images), momentum 0.9, weight decay 1e-4, 500-iter
# linear warm-up, 12 epochs, lr x0.1 after epochs 8 and 11; ImageNet-pretrained backbone (official
# configs: r50_mrlal_77.75.pth.tar), frozen_stages=1, norm_eval; no drop path on the MRLA branch.
#
# This config: that stock recipe (SGD lr 0.02 for total batch 16 = 8 GPUs x 2 images, momentum 0.9,
# weight decay 1e-4, 500-iter warm-up, steps at epochs 8 and 11) with auto_scale_lr enabled, so the lr
# follows the linear rule for the batch actually run (GPUs x train_dataloader.batch_size): e.g. 2 GPUs x
# 4 images -> 0.01. Backbone as in the official code: frozen_stages=1 (stem and stage 1, including their
# attention modules), norm_eval (every BatchNorm, the attention modules' too) and
# no drop path on the MRLA branch (the official MRLA-L detection backbone has none).
#
# Weights: the trunk starts from timm's ImageNet `resnet50` weights, `resnet50.a1_in1k` (what
# `timm.create_model('resnet50', pretrained=True)` loads), downloaded from the Hugging Face Hub on first use
# and cached there; the MRLA-L modules start freshly initialised (no layer-attention ImageNet weights are
# published). The weights are checked when the model is built, before any dataset. Offline, or from your own
# copy of a timm / torchvision resnet50 state dict (.safetensors or torch file):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet50.safetensors
# With layer-attention weights of `resnet50_mrlal` (.safetensors / torch file, official training checkpoints
# included, local-dir:DIR or hf-hub:ORG/NAME):
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['timm_layerattn.det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='LayerAttnResNet',
        arch='resnet50_mrlal',
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        drop_path_rate=0.0,
        init_cfg=dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))

auto_scale_lr = dict(enable=True, base_batch_size=16)
