"""The shipped MMDetection configs: exact names, paper hyperparameters, ImageNet trunk weights that fit, every
detector builds (offline, trunk weights from a test-made Hugging Face cache), wheel install."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmcv.ops')

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import timm_layerattn  # noqa: E402
from _det_utils import (CONFIG_DIR, REPO, add_to_hub_cache, offline_hub, trunk_shapes,  # noqa: E402
                        write_sparse_safetensors)
from timm_layerattn.det.trunk import trunk_mismatch  # noqa: E402
from timm_layerattn.tools.det_configs import base_fragments, config_dir, list_configs  # noqa: E402

pytestmark = pytest.mark.det

# config-name part -> (arch suffix, depths, drop_path_rate: the official detection backbone's, or the documented
# choice). A new variant is one line here plus its config files.
LAYER_ATTN = {
    'kcla': ('kcla', (50, 101), 0.2),
    'mrlal': ('mrlal', (50, 101), 0.0),
    'mrlab': ('mrlab', (50, 101), 0.0),
    'as-stages': ('as_stages', (50, 101), 0.0),
}
# The plain timm ResNet whose ImageNet weights start each arch's trunk: MRLA-B nets have the deep stem of
# timm's `resnet50c` / `resnet101c`, the others the stem of `resnet50` / `resnet101`.
TRUNK_STEM = {'kcla': '', 'mrlal': '', 'mrlab': 'c', 'as-stages': ''}
# config-name detector -> (MMDetection model type, the layer-attention parts shipped with it, SGD lr at batch 16).
# RetinaNet: MRLA's recipe (lr 0.01), for the families of the KCLA / MRLA papers.
DETECTORS = {
    'faster-rcnn': ('FasterRCNN', tuple(LAYER_ATTN), 0.02),
    'mask-rcnn': ('MaskRCNN', tuple(LAYER_ATTN), 0.02),
    'retinanet': ('RetinaNet', ('kcla', 'mrlal', 'mrlab'), 0.01),
}
EXPECTED = sorted(
    f'{det}_r{depth}-{part}_fpn_1x_coco.py'
    for det, (_, parts, _) in DETECTORS.items() for part in parts for depth in LAYER_ATTN[part][1])


def parse(name: str):
    """`(detector, depth, part)` of a config name, e.g. ('mask-rcnn', '101', 'as-stages')."""
    det, rest = name.split('_r', 1)
    depth, part = rest.split('_', 1)[0].split('-', 1)
    return det, depth, part


def test_exactly_the_expected_configs_ship():
    assert sorted(p.name for p in CONFIG_DIR.glob('*.py')) == EXPECTED
    # The package's config folder (what a wheel installs) holds the very same files.
    assert list_configs() == EXPECTED
    for name in EXPECTED:
        assert (config_dir() / name).read_bytes() == (CONFIG_DIR / name).read_bytes()


@pytest.mark.parametrize('name', EXPECTED)
def test_configs_state_the_shared_part_once(name):
    """R50 configs: MMDetection's detector config plus `_base_/layer_attn_backbone.py`, the backbone taken from
    it (and not left behind as a key of its own); R101 configs: their R50 config, with arch and trunk only."""
    assert base_fragments() == ['layer_attn_backbone.py']
    text = (CONFIG_DIR / name).read_text()
    det, depth, _ = parse(name)
    if depth == '50':
        assert "'./_base_/layer_attn_backbone.py']" in text and "_base_.pop('layer_attn_backbone')" in text
        assert f"'mmdet::{det.replace('-', '_')}/{det}_r50_fpn_1x_coco.py'" in text
    else:
        assert f"_base_ = './{name.replace('_r101-', '_r50-')}'" in text
        assert "type='LayerAttnResNet'" not in text and 'drop_path_rate' not in text
    assert 'out_indices' not in text and 'layer_attn_backbone' not in Config.fromfile(str(CONFIG_DIR / name)).to_dict()


@pytest.mark.parametrize('name', EXPECTED)
def test_config_resolves_to_the_paper_recipe(name):
    cfg = Config.fromfile(str(CONFIG_DIR / name))
    det, depth, part = parse(name)
    model_type, _, lr = DETECTORS[det]
    suffix, _, drop_path_rate = LAYER_ATTN[part]
    arch = f'resnet{depth}_{suffix}'
    assert cfg.custom_imports == dict(imports=['timm_layerattn.det'], allow_failed_imports=False)
    assert cfg.model.type == model_type
    bb = cfg.model.backbone
    assert bb.type == 'LayerAttnResNet' and bb.arch == arch
    assert 'depth' not in bb and 'num_stages' not in bb  # `_delete_` dropped mmdet's ResNet arguments
    assert bb.out_indices == (0, 1, 2, 3) and bb.frozen_stages == 1 and bb.norm_eval is True
    assert bb.drop_path_rate == drop_path_rate
    trunk = f'resnet{depth}{TRUNK_STEM[part]}'
    default = timm.models.get_pretrained_cfg(trunk)  # what timm.create_model(trunk, pretrained=True) loads
    assert bb.init_cfg == dict(type='TimmTrunk', checkpoint=f'{trunk}.{default.tag}')
    assert default.hf_hub_id == f'timm/{trunk}.{default.tag}'
    assert cfg.model.neck.in_channels == [256, 512, 1024, 2048]
    # 1x schedule, SGD at 0.02 (RetinaNet 0.01) for batch 16, scaled to the real batch by the linear rule.
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=lr, momentum=0.9, weight_decay=0.0001)
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.train_cfg.max_epochs == 12 and cfg.train_dataloader.batch_size == 2
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 0.001, 500)
    assert (steps.type, steps.milestones, steps.gamma) == ('MultiStepLR', [8, 11], 0.1)
    assert ('segm' in cfg.val_evaluator.metric) == (det == 'mask-rcnn')
    header = (CONFIG_DIR / name).read_text().split('\n\n')[0]
    assert 'Paper' in header and 'This config' in header
    weights = header[header.index('# Weights:'):]
    assert f'`{trunk}.{default.tag}`' in weights and f"timm.create_model('{trunk}', pretrained=True)" in weights
    assert f'--cfg-options model.backbone.init_cfg.checkpoint=/path/to/{trunk}.safetensors' in weights
    assert '--cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH' in weights
    assert 'checkpoints/' not in (CONFIG_DIR / name).read_text()
    if suffix == 'kcla' and det != 'retinanet':  # the paper's lr values as written, next to the linear rule's
        assert ('0.1' in header) if depth == '50' else ('0.05' in header)
    if det == 'retinanet':
        prose = ' '.join(line.lstrip('# ') for line in header.splitlines())
        assert 'retinanet_r50mrlal_fpn_1x_coco.py' in prose and 'lr 0.01 for total batch 16' in prose


@pytest.mark.parametrize('depth', [50, 101])
def test_retinanet_is_mrlas_official_detector(depth):
    """The RetinaNet configs resolve to the official MRLA RetinaNet (joyfang1106/MRLA
    `configs/_base_/models/retinanet_r50mrlal_fpn.py`): its neck, head, anchors, losses, assigner and test
    settings, for every family."""
    for part in DETECTORS['retinanet'][1]:
        m = Config.fromfile(str(CONFIG_DIR / f'retinanet_r{depth}-{part}_fpn_1x_coco.py')).model
        assert (m.neck.type, m.neck.out_channels, m.neck.start_level, m.neck.add_extra_convs, m.neck.num_outs) == \
            ('FPN', 256, 1, 'on_input', 5)
        h = m.bbox_head
        assert (h.type, h.num_classes, h.in_channels, h.stacked_convs, h.feat_channels) == \
            ('RetinaHead', 80, 256, 4, 256)
        a = h.anchor_generator
        assert (a.octave_base_scale, a.scales_per_octave, a.ratios, a.strides) == \
            (4, 3, [0.5, 1.0, 2.0], [8, 16, 32, 64, 128])
        assert h.bbox_coder == dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                                    target_stds=[1.0, 1.0, 1.0, 1.0])
        assert h.loss_cls == dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
        assert h.loss_bbox == dict(type='L1Loss', loss_weight=1.0)
        t = m.train_cfg
        assert (t.assigner.type, t.assigner.pos_iou_thr, t.assigner.neg_iou_thr, t.assigner.min_pos_iou,
                t.assigner.ignore_iof_thr) == ('MaxIoUAssigner', 0.5, 0.4, 0, -1)
        assert (t.allowed_border, t.pos_weight) == (-1, -1)
        assert m.test_cfg == dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                                  nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)


@pytest.mark.parametrize('part', sorted(LAYER_ATTN))
@pytest.mark.parametrize('depth', [50, 101])
def test_trunk_weights_fit_the_arch(part, depth):
    """timm's trunk named by the configs covers every non-attention tensor of the arch, names and shapes."""
    arch = f'resnet{depth}_{LAYER_ATTN[part][0]}'
    with torch.device('meta'):
        model = timm.create_model(arch, num_classes=0)
    shapes = {k: shape for k, (_, shape) in trunk_shapes(f'resnet{depth}{TRUNK_STEM[part]}').items()}
    assert trunk_mismatch(model, shapes) == []
    if TRUNK_STEM[part]:  # and the plain stem would not do
        plain = {k: shape for k, (_, shape) in trunk_shapes(f'resnet{depth}').items()}
        assert trunk_mismatch(model, plain)


@pytest.fixture(scope='module')
def trunk_cache(tmp_path_factory):
    """A Hugging Face cache holding the four shipped trunks as sparse all-zero safetensors files."""
    root = tmp_path_factory.mktemp('trunks')
    for trunk in ('resnet50', 'resnet101', 'resnet50c', 'resnet101c'):
        tag = timm.models.get_pretrained_cfg(trunk).tag
        path = write_sparse_safetensors(root / f'{trunk}.safetensors', trunk_shapes(trunk))
        add_to_hub_cache(root / 'hub', f'timm/{trunk}.{tag}', {'model.safetensors': path})
    return root / 'hub'


@pytest.mark.parametrize('name', EXPECTED)
def test_config_builds_its_detector(name, trunk_cache, monkeypatch):
    from mmdet.registry import MODELS
    offline_hub(monkeypatch, trunk_cache)
    cfg = Config.fromfile(str(CONFIG_DIR / name))
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    assert model.backbone.arch == cfg.model.backbone.arch
    assert model.backbone.out_channels == cfg.model.neck.in_channels
    if 'roi_head' in cfg.model:
        assert model.backbone.strides == list(cfg.model.roi_head.bbox_roi_extractor.featmap_strides)
    else:  # RetinaNet: FPN from stage 2 (stride 8), two extra levels
        start = cfg.model.neck.start_level
        strides = model.backbone.strides[start:]
        assert strides + [strides[-1] * 2, strides[-1] * 4] == cfg.model.bbox_head.anchor_generator.strides
    assert type(model).__name__ == DETECTORS[parse(name)[0]][0]
    assert getattr(model, 'with_mask', False) == name.startswith('mask')
    assert model.backbone._trunk_init.weights.path.startswith(str(trunk_cache))


def test_configs_load_from_a_wheel_install(tmp_path, trunk_cache):
    """`pip wheel .` then an install of the wheel (no checkout on the path) finds and builds the configs
    (and ships the C++ source of the fused CPU kernels)."""
    src = tmp_path / 'src'
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_symlink() or (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            if (REPO / rel).is_symlink():
                os.symlink(os.readlink(REPO / rel), src / rel)
            else:
                shutil.copy2(REPO / rel, src / rel)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['wheel', str(src), '--no-deps', '--no-build-isolation', '-w', str(tmp_path / 'dist')],
                   check=True, capture_output=True)
    wheel, = (tmp_path / 'dist').glob('timm_layerattn-*.whl')
    subprocess.run(pip + ['install', '--no-deps', '--target', str(tmp_path / 'site'), str(wheel)],
                   check=True, capture_output=True)
    code = textwrap.dedent("""
        import subprocess, sys
        from pathlib import Path
        import timm_layerattn
        assert timm_layerattn.__file__.startswith(sys.argv[1]), timm_layerattn.__file__
        from timm_layerattn.cli import main
        from timm_layerattn.layers import native
        assert native.SOURCE.is_file() and str(native.SOURCE).startswith(sys.argv[1]), native.SOURCE
        assert all(f.is_file() for f in native.SOURCES + native.HEADERS), native.SOURCES + native.HEADERS
        native.build()  # from the installed sources, into an empty cache
        from timm_layerattn.tools.det_configs import config_dir
        folder = config_dir()
        assert str(folder).startswith(sys.argv[1]) and not folder.is_symlink(), folder
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        cfg = Config.fromfile(str(folder / 'mask-rcnn_r101-kcla_fpn_1x_coco.py'))  # inherits the R50 file
        init_default_scope('mmdet')
        from mmdet.registry import MODELS
        model = MODELS.build(cfg.model)
        print(type(model).__name__, model.backbone.arch, len(list(folder.glob('*.py'))))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / 'site'), HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(trunk_cache),
               TIMM_LAYERATTN_CACHE=str(tmp_path / 'cache'))
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'site')], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ['MaskRCNN', 'resnet101_kcla', str(len(EXPECTED))]


def test_cli_prints_the_config_paths(tmp_path):
    from timm_layerattn.cli import main
    assert main(['det-configs', '--copy', str(tmp_path / 'mine')]) == 0
    assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == sorted(EXPECTED + ['_base_'])
    assert sorted(p.name for p in (tmp_path / 'mine' / '_base_').iterdir()) == base_fragments()
    # The copy resolves on its own: R101 through its R50 config, R50 through the copied _base_/.
    name = 'mask-rcnn_r101-kcla_fpn_1x_coco.py'
    assert Config.fromfile(str(tmp_path / 'mine' / name)).to_dict() == Config.fromfile(str(CONFIG_DIR / name)).to_dict()
    assert main(['det-configs', '--copy', str(tmp_path / 'mine')]) == 2  # no silent overwrite
    assert main(['det-configs', 'no-such-*']) == 2
    assert Path(timm_layerattn.__file__).parent / 'det' / 'configs' == config_dir()
