"""Weights to the Hugging Face Hub: export a Hub-ready folder, render its model card, push it.

A folder holds exactly what timm loads: `model.safetensors` (the plain state dict), `config.json` in timm's
format (written by `timm.models.save_for_hf`) and `README.md`, a model card rendered from the family's template
in `hub_cards/`; with `onnx=True` (`export --onnx`) also `model.onnx`, checked against onnxruntime. Every
export is written to a temporary sibling folder, reloaded through `timm.create_model('local-dir:...',
pretrained=True)` and compared bit for bit with the source model before it is renamed into place, so a folder
that exists is a folder that loads.

Pushing uses `huggingface_hub` (`create_repo` + `upload_folder`); it is imported only when used.

Modules: `card` (dataset metadata, card families, card rendering), `export` (export, verification, output-folder
checks), `source` (reading any checkpoint file a user has, building the model it fits), `onnx` (ONNX export and
its onnxruntime check; onnx, onnxscript and onnxruntime are imported only when used), `push` (folder validation,
staging, upload).
"""
from .card import (
    CARD_TAGS, card_families, YOUR_ORG, card_template_path, model_family, render_model_card, resolve_dataset)
from .export import HUB_FILES, OPTIONAL_HUB_FILES, check_export_dir, export_folder, hub_files, is_export_folder
from .onnx import OnnxExport, export_onnx
from .push import PushResult, push_folder, validate_folder
from .source import load_model_from_checkpoint, read_checkpoint

__all__ = ['export_folder', 'is_export_folder', 'check_export_dir', 'load_model_from_checkpoint', 'read_checkpoint',
           'export_onnx', 'OnnxExport', 'render_model_card', 'model_family', 'validate_folder',
           'push_folder', 'PushResult', 'card_template_path', 'card_families', 'CARD_TAGS', 'HUB_FILES',
           'OPTIONAL_HUB_FILES', 'hub_files', 'YOUR_ORG', 'resolve_dataset']
