# What every config in the folder above shares: the layer-attention ResNet in place of MMDetection's ResNet, and
# the recipe around it. A config lists this file after MMDetection's detector config in `_base_` and sets only
# what differs: the `arch`, its `drop_path_rate` and the trunk weights (`init_cfg`); an R101 config inherits its
# R50 config and sets `arch` and the trunk weights.
#
# The recipe: MMDetection's stock 1x schedule (SGD lr 0.02 for total batch 16 = 8 GPUs x 2 images, momentum 0.9,
# weight decay 1e-4, 500-iter warm-up, steps at epochs 8 and 11) with auto_scale_lr enabled (set by each config,
# since MMDetection's schedule sets it too), so the lr follows the linear rule for the batch actually run
# (GPUs x train_dataloader.batch_size): e.g. 2 GPUs x 4 images -> 0.01. Backbone as in the official code:
# frozen_stages=1 (stem and stage 1, including their attention modules) and norm_eval (every BatchNorm, the
# attention modules' too). The FPN keeps MMDetection's in_channels [256, 512, 1024, 2048], the widths of the
# ResNet-50 / 101 stages.
#
# Weights: the trunk starts from the timm ImageNet weights of the plain ResNet a config names (`TimmTrunk`),
# downloaded from the Hugging Face Hub on first use and cached there; the layer-attention modules start freshly
# initialised (no layer-attention ImageNet weights are published). The weights are checked when the model is
# built, before any dataset. Offline, or from your own copy of that trunk's timm (or torchvision, for the plain
# stems) state dict (.safetensors or torch file):
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/<trunk>.safetensors
# With layer-attention weights of the config's arch (.safetensors / torch file, official KCLA / MRLA training
# checkpoints included, local-dir:DIR or hf-hub:ORG/NAME):
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH

custom_imports = dict(imports=['timm_layerattn.det'], allow_failed_imports=False)

# Each R50 config takes this with `_base_.pop('layer_attn_backbone')`, so the resolved config holds it as
# `model.backbone` only, and sets the entries marked below.
layer_attn_backbone = dict(
    _delete_=True,  # replaces MMDetection's ResNet, none of its arguments (depth, num_stages, ...) kept
    type='LayerAttnResNet',
    arch=None,  # set by each config, e.g. 'resnet50_kcla'
    out_indices=(0, 1, 2, 3),
    frozen_stages=1,
    norm_cfg=dict(type='BN', requires_grad=True),
    norm_eval=True,
    drop_path_rate=None,  # set by each config: the family's recipe
    init_cfg=None)  # set by each config: dict(type='TimmTrunk', checkpoint='<timm trunk>.<pretrained tag>')
