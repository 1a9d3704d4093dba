"""End-to-end MMDetection runs on a synthetic COCO dataset written by the test (CPU, mmengine's Runner)."""
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
from mmdet.datasets import CocoDataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _det_utils import CONFIG_DIR, lighten, make_coco, point_to_data, quiet  # noqa: E402

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


def test_mask_rcnn_trains_evaluates_and_resumes(tmp_path):
    """Loss goes down over a short run, COCO bbox + segm evaluation runs, a Runner checkpoint resumes."""
    make_coco(tmp_path / 'data', num_images=2)  # one fixed batch: the net must fit it
    cfg = Config.fromfile(str(CONFIG_DIR / 'mask-rcnn_r50-kcla_fpn_1x_coco.py'))
    point_to_data(cfg, tmp_path / 'data', num_classes=2)
    lighten(cfg, iters=10)
    cfg.model.backbone.init_cfg = None  # from scratch: no ImageNet weights in a unit test
    cfg.work_dir = str(tmp_path / 'work')
    cfg.randomness = dict(seed=0)
    runner, catcher = _runner(cfg)
    runner.train()

    losses = _losses(runner)
    assert len(losses) == 10 and np.isfinite(losses).all()
    assert losses[-4:].mean() < 0.9 * losses[:4].mean(), losses
    metrics = catcher.metrics
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert key in metrics and math.isfinite(metrics[key]) and -1 <= metrics[key] <= 1, (key, metrics)

    # Resume (optimizer, schedulers, message hub with its HistoryBuffers) from the checkpoint the Runner
    # saved: `torch.load` defaults to weights_only under torch >= 2.6, which mmengine alone cannot read.
    ckpt = Path(cfg.work_dir) / 'iter_10.pth'
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(ckpt)
    saved = runner.model.state_dict()
    cfg.train_cfg.max_iters = 12
    cfg.resume, cfg.load_from = True, str(ckpt)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    resumed, _ = _runner(cfg)
    resumed.train()
    assert resumed.iter == 12
    assert len(_losses(resumed)) == 12 and np.allclose(_losses(resumed)[:10], losses)
    # Frozen stem weights are exactly those of the checkpoint after two more steps.
    assert torch.equal(resumed.model.state_dict()['backbone.model.conv1.weight'], saved['backbone.model.conv1.weight'])


def test_shipped_config_trains_and_tests_as_is(tmp_path, monkeypatch):
    """faster-rcnn_r50-mrlal as shipped (only data paths, image scale and the epoch count changed): the
    backbone weights load from the config's own `checkpoints/` path, one epoch trains, validation runs, and
    `tools/test.py`'s path (`load_from` + `Runner.test`) reads the saved checkpoint."""
    monkeypatch.chdir(tmp_path)
    make_coco(tmp_path / 'data', num_images=2, classes=CocoDataset.METAINFO['classes'])  # batch 2: 1 iter/epoch
    torch.manual_seed(5)
    weights = timm.create_model('resnet50_mrlal').state_dict()
    Path('checkpoints').mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, 'checkpoints/resnet50_mrlal.safetensors')

    cfg = Config.fromfile(str(CONFIG_DIR / 'faster-rcnn_r50-mrlal_fpn_1x_coco.py'))
    point_to_data(cfg, tmp_path / 'data')
    quiet(cfg)
    cfg.train_cfg.max_epochs = 1
    cfg.work_dir = str(tmp_path / 'work')
    runner, catcher = _runner(cfg)
    runner.train()
    assert runner.iter == 1 and np.isfinite(_losses(runner)).all()
    state = runner.model.state_dict()
    for key in ('conv1.weight', 'layer1.0.attn.lambda_t', 'layer1.2.conv3.weight'):  # frozen: as loaded
        assert torch.equal(state[f'backbone.model.{key}'], weights[key]), key
    assert 'coco/bbox_mAP' in catcher.metrics

    cfg.load_from = str(tmp_path / 'work' / 'epoch_1.pth')
    tester, catcher = _runner(cfg)
    tester.test()
    assert 'coco/bbox_mAP' in catcher.metrics
    for key, value in tester.model.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)
