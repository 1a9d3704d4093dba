"""`timm-layerattn det-smoke CONFIG`: two training iterations and the COCO evaluations of a shipped config on a
generated tiny COCO set, on CPU, through the command itself; temporary files gone afterwards, also on errors."""
import math
import re
import tempfile

import pytest

pytest.importorskip('mmcv.ops')

import timm  # noqa: E402

from _det_utils import CONFIG_DIR, offline_hub, save_state_dict  # noqa: E402
from timm_layerattn.cli import main  # noqa: E402

pytestmark = pytest.mark.det


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """`tempfile`'s folder for the test: whatever the command leaves there is visible."""
    root = tmp_path / 'tmp'
    root.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(root))
    return root


def _smoke(capsys, *args):
    rc = main(['det-smoke', *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _losses(out: str):
    rows = [dict(re.findall(r'(\w+) (-?[\d.]+|nan|inf)', line.split('  ', 1)[1]))
            for line in out.splitlines() if line.startswith('iter ')]
    return [{k: float(v) for k, v in row.items()} for row in rows]


def _metrics(out: str, split: str):
    line, = [line for line in out.splitlines() if line.startswith(f'{split} ')]
    return {k: float(v) for k, v in re.findall(r'(coco/\w+) (-?[\d.]+)', line)}


def test_faster_rcnn_smoke_as_shipped(capsys, tmp_root):
    rc, out, err = _smoke(capsys, 'faster-rcnn_r50-mrlal_fpn_1x_coco')
    assert rc == 0, err
    assert 'FasterRCNN, backbone LayerAttnResNet resnet50_mrlal, trunk init: random' in out
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(v) for row in losses for v in row.values()), out
    assert {'loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox'} <= set(losses[0])
    for split in ('val', 'test'):
        metrics = _metrics(out, split)
        assert {'coco/bbox_mAP', 'coco/bbox_mAP_50'} <= set(metrics) and 'coco/segm_mAP' not in metrics
        assert all(-1 <= v <= 1 for v in metrics.values()), metrics
    assert out.splitlines()[-1].startswith('ok: faster-rcnn_r50-mrlal_fpn_1x_coco.py trained 2 iterations')
    assert 'mmengine' not in out and not err  # mmengine's log and pycocotools' tables are held back
    assert list(tmp_root.iterdir()) == []


def test_retinanet_smoke_as_shipped(capsys, tmp_root):
    """A one-stage detector (no RPN or RoI head: `det-smoke` tunes only what the config has) through the command."""
    rc, out, err = _smoke(capsys, 'retinanet_r50-kcla_fpn_1x_coco.py', '--iters', '1')
    assert rc == 0, err
    assert 'RetinaNet, backbone LayerAttnResNet resnet50_kcla, trunk init: random' in out
    losses = _losses(out)
    assert len(losses) == 1 and set(losses[0]) == {'loss', 'loss_cls', 'loss_bbox'}, out
    assert all(math.isfinite(v) for v in losses[0].values()) and losses[0]['loss_cls'] > 0
    for split in ('val', 'test'):
        metrics = _metrics(out, split)
        assert {'coco/bbox_mAP', 'coco/bbox_mAP_50'} <= set(metrics) and 'coco/segm_mAP' not in metrics
        assert all(-1 <= v <= 1 for v in metrics.values()), metrics
    assert out.splitlines()[-1].startswith('ok: retinanet_r50-kcla_fpn_1x_coco.py trained 1 iterations')
    assert list(tmp_root.iterdir()) == []


def test_mask_rcnn_smoke_with_a_local_imagenet_trunk(capsys, tmp_root, tmp_path):
    """--pretrained keeps the config's TimmTrunk init; --cfg-options points it at a local timm resnet50 file."""
    trunk = save_state_dict(timm.create_model('resnet50').state_dict(), tmp_path / 'resnet50.safetensors')
    rc, out, err = _smoke(capsys, str(CONFIG_DIR / 'mask-rcnn_r50-as-stages_fpn_1x_coco.py'), '--pretrained',
                          '--iters', '1', '--cfg-options', f'model.backbone.init_cfg.checkpoint={trunk}')
    assert rc == 0, err
    assert f'MaskRCNN, backbone LayerAttnResNet resnet50_as_stages, trunk init: TimmTrunk {trunk}' in out
    assert len(_losses(out)) == 1 and 'loss_mask' in _losses(out)[0]
    for split in ('val', 'test'):
        assert {'coco/bbox_mAP', 'coco/segm_mAP', 'coco/segm_mAP_50'} <= set(_metrics(out, split))
    assert list(tmp_root.iterdir()) == []


def test_bad_configs_fail_clearly_and_leave_nothing(capsys, tmp_root, tmp_path, monkeypatch):
    rc, _, err = _smoke(capsys, 'faster-rcnn_r50-kcla')
    assert rc == 2 and 'did you mean faster-rcnn_r50-kcla_fpn_1x_coco.py?' in err
    rc, _, err = _smoke(capsys, str(tmp_path))
    assert rc == 2 and 'is not a file' in err

    broken = tmp_path / 'broken.py'
    broken.write_text('model = dict(\n')
    rc, _, err = _smoke(capsys, str(broken))
    assert rc == 2 and 'cannot read config' in err and 'SyntaxError' in err

    voc = tmp_path / 'voc.py'
    voc.write_text(f"_base_ = '{CONFIG_DIR / 'faster-rcnn_r50-kcla_fpn_1x_coco.py'}'\n"
                   "train_dataloader = dict(dataset=dict(type='VOCDataset'))\n")
    rc, _, err = _smoke(capsys, str(voc))
    assert rc == 2 and "the train dataset is 'VOCDataset' (not a CocoDataset)" in err

    # Fails when the Runner builds the model, after the data was generated: still nothing left behind.
    rc, out, err = _smoke(capsys, 'faster-rcnn_r50-kcla_fpn_1x_coco.py', '--cfg-options', 'model.backbone.arch=nope')
    assert rc == 2 and 'does not build' in err and 'nope' in err and 'data: 4 generated images' in out
    rc, _, err = _smoke(capsys, 'faster-rcnn_r50-kcla_fpn_1x_coco.py', '--cfg-options', 'model.backbone.arch')
    assert rc == 2 and 'KEY=VALUE' in err

    # --pretrained offline without a cached copy: the one message with the cache and the way out.
    cache = offline_hub(monkeypatch, tmp_path / 'hf')
    rc, _, err = _smoke(capsys, 'mask-rcnn_r50-kcla_fpn_1x_coco.py', '--pretrained')
    assert rc == 2 and str(cache) in err and 'model.backbone.init_cfg.checkpoint=/path/to/resnet50.safetensors' in err
    assert err.count('\n') == 1 and 'tools/test.py with a trained detector needs none' in err  # whole, one line
    assert list(tmp_root.iterdir()) == []
