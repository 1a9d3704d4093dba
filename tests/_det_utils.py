"""Shared helpers of the MMDetection tests: the package's tiny COCO set and config overrides, short runs, and an
offline Hugging Face cache holding timm trunk weights (real or sparse all-zero files)."""
import json
import os
import struct
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch

from timm_layerattn.det.smoke import point_to_data  # noqa: F401  (one implementation for tests and det-smoke)
from timm_layerattn.det.tiny_coco import SHAPES as CLASSES  # noqa: F401
from timm_layerattn.det.tiny_coco import make_tiny_coco as make_coco  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'mmdet_configs'
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def lighten(cfg, iters: int, lr: float = 0.01, batch_size: int = 2) -> None:
    """Short iteration-based run at a constant lr, with fewer proposals / RoIs than the COCO recipe (CPU speed)
    and every detection kept for evaluation."""
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)
    cfg.param_scheduler = []
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.auto_scale_lr.enable = False
    cfg.train_dataloader.batch_size = batch_size
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.train_dataloader.pop('batch_sampler', None)
    cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=True, min_size=8)
    model = cfg.model
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 64
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    model.test_cfg.rcnn.score_thr = 0.0  # as det-smoke: a barely trained net still gives detections to evaluate
    quiet(cfg, log_interval=1)
    cfg.log_processor = dict(by_epoch=False, window_size=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=iters, by_epoch=False)


def quiet(cfg, log_interval: int = 1) -> None:
    """Per-iteration log entries, no visualisation output."""
    cfg.default_hooks.logger.interval = log_interval
    cfg.default_hooks.visualization = dict(type='DetVisualizationHook', draw=False)
    cfg.log_level = 'WARNING'


# -- trunk weights and an offline Hub cache ---------------------------------------------------------------------

def trunk_shapes(arch: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """dtype and shape of every tensor of timm's `arch` (built on the meta device: no memory, no time)."""
    import timm
    with torch.device('meta'):
        model = timm.create_model(arch)
    return {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


_ST_DTYPES = {torch.float32: 'F32', torch.int64: 'I64'}


def write_sparse_safetensors(path: Union[str, Path], shapes: Mapping[str, Tuple[torch.dtype, Tuple[int, ...]]]) -> Path:
    """A valid safetensors file of all-zero tensors with these shapes, written as a sparse file (no data on disk).

    Enough wherever only names and shapes matter (building detectors from configs); `safetensors` reads it.
    """
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, (dtype, shape) in shapes.items():
        size = torch.empty((), dtype=dtype).element_size()
        for n in shape:
            size *= n
        header[name] = {'dtype': _ST_DTYPES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b' ' * (-len(blob) % 8)
    path = Path(path)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: Union[str, Path]) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return Path(path)


def add_to_hub_cache(cache: Union[str, Path], repo_id: str, files: Mapping[str, Union[str, Path]],
                     revision: str = 'main') -> Path:
    """Put `files` (name -> local file, linked) into a huggingface_hub cache as snapshot `COMMIT` of `repo_id`."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / revision).write_text(COMMIT)
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        if os.path.lexists(snapshot / name):
            os.remove(snapshot / name)
        os.symlink(os.path.abspath(source), snapshot / name)
    return snapshot


def offline_hub(monkeypatch, cache: Union[str, Path]) -> Path:
    """huggingface_hub in offline mode with `cache` as its cache, for this test (read at call time)."""
    from huggingface_hub import constants
    Path(cache).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return Path(cache)
