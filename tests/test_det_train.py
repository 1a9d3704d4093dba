"""End-to-end MMDetection runs on a synthetic COCO dataset written by the test (CPU, mmengine's Runner).

The shipped configs as they are, through `timm-layerattn det-smoke`, are in test_det_smoke.py."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('mmcv.ops')

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _det_utils import CONFIG_DIR, lighten, make_coco, point_to_data  # noqa: E402

pytestmark = pytest.mark.det


class MetricsCatcher(Hook):
    """Keeps the metrics of the last validation / test epoch."""
    priority = 'LOWEST'

    def __init__(self):
        self.metrics = None

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = metrics

    def after_test_epoch(self, runner, metrics=None):
        self.metrics = metrics


def _runner(cfg) -> tuple:
    runner = Runner.from_cfg(cfg)
    catcher = MetricsCatcher()
    runner.register_hook(catcher)
    return runner, catcher


def _losses(runner) -> np.ndarray:
    return runner.message_hub.get_scalar('train/loss').data[0]


def test_mask_rcnn_trains_evaluates_resumes_and_tests(tmp_path):
    """The trunk loads from a timm resnet50 file through the Runner (as `--cfg-options
    model.backbone.init_cfg.checkpoint=FILE` sets it), the attention modules start fresh, the loss goes down over
    a short run, COCO bbox + segm evaluation runs, a Runner checkpoint resumes, and `tools/test.py`'s path
    (`load_from` + `Runner.test`) reads it."""
    make_coco(tmp_path / 'data', num_images=2)  # one fixed batch: the net must fit it
    torch.manual_seed(5)
    weights = timm.create_model('resnet50').state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / 'resnet50.safetensors'))
    cfg = Config.fromfile(str(CONFIG_DIR / 'mask-rcnn_r50-kcla_fpn_1x_coco.py'))
    cfg.merge_from_dict({'model.backbone.init_cfg.checkpoint': str(tmp_path / 'resnet50.safetensors')})
    point_to_data(cfg, tmp_path / 'data', num_classes=2)
    lighten(cfg, iters=10)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.randomness = dict(seed=0)
    runner, catcher = _runner(cfg)
    fresh = {k: v.clone() for k, v in runner.model.state_dict().items()}
    runner.train()

    losses = _losses(runner)
    assert len(losses) == 10 and np.isfinite(losses).all()
    assert losses[-4:].mean() < 0.9 * losses[:4].mean(), losses
    metrics = catcher.metrics
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert key in metrics and math.isfinite(metrics[key]) and -1 <= metrics[key] <= 1, (key, metrics)
    saved = runner.model.state_dict()
    for key in ('conv1.weight', 'layer1.2.conv3.weight', 'layer1.0.bn1.running_mean'):  # frozen: as loaded
        assert torch.equal(saved[f'backbone.model.{key}'], weights[key]), key
    frozen_attn = 'backbone.model.layer1.0.attn.q.weight'  # frozen, not in the file: as constructed
    assert frozen_attn in fresh and torch.equal(saved[frozen_attn], fresh[frozen_attn])
    assert not torch.equal(saved['backbone.model.layer4.0.conv1.weight'], weights['layer4.0.conv1.weight'])

    # Resume (optimizer, schedulers, message hub with its HistoryBuffers) from the checkpoint the Runner
    # saved: `torch.load` defaults to weights_only under torch >= 2.6, which mmengine alone cannot read.
    ckpt = Path(cfg.work_dir) / 'iter_10.pth'
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(ckpt)
    cfg.train_cfg.max_iters = 12
    cfg.resume, cfg.load_from = True, str(ckpt)
    val = cfg.val_cfg, cfg.val_dataloader, cfg.val_evaluator
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    resumed, _ = _runner(cfg)
    resumed.train()
    assert resumed.iter == 12
    assert len(_losses(resumed)) == 12 and np.allclose(_losses(resumed)[:10], losses)
    # Frozen stem weights are exactly those of the checkpoint after two more steps.
    assert torch.equal(resumed.model.state_dict()['backbone.model.conv1.weight'], saved['backbone.model.conv1.weight'])

    # tools/test.py: the config with `load_from`, then `Runner.test()` (no init_weights, no training).
    cfg.resume, cfg.load_from = False, str(ckpt)
    cfg.val_cfg, cfg.val_dataloader, cfg.val_evaluator = val
    tester, catcher = _runner(cfg)
    tester.test()
    assert 'coco/segm_mAP' in catcher.metrics
    for key, value in tester.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
