"""`TimmTrunk`: the shipped configs' backbone init from timm's ImageNet ResNet weights, checked at build time.

Hub paths run offline only: huggingface_hub in offline mode over a cache written by the test (`_det_utils`).
"""
import argparse

import pytest
import torch

pytest.importorskip('mmcv.ops')

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import timm_layerattn.det  # noqa: E402,F401
from _det_utils import CONFIG_DIR, add_to_hub_cache, offline_hub, save_state_dict  # noqa: E402
from timm_layerattn.det import LayerAttnResNet  # noqa: E402
from timm_layerattn.det.checkpoint import CFG_OPTION, WeightsNotFound  # noqa: E402
from timm_layerattn.det.trunk import TimmTrunkInit  # noqa: E402

pytestmark = pytest.mark.det


@pytest.fixture(scope='module')
def resnet50_file(tmp_path_factory):
    """A timm resnet50 state dict with random (not default-init) values, as a safetensors file."""
    torch.manual_seed(7)
    state = timm.create_model('resnet50').state_dict()
    with torch.no_grad():
        for v in state.values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.01)
    return state, save_state_dict(state, tmp_path_factory.mktemp('trunk') / 'resnet50.safetensors')


def _assert_trunk_loaded(backbone: LayerAttnResNet, state, fresh):
    """Every non-attention tensor equals the file's; the attention ones are what the constructor made."""
    got = backbone.model.state_dict()
    attention = [k for k in got if k not in state]
    assert attention and all('.attn' in k or k.startswith('as_proj.') for k in attention), attention[:5]
    for k, v in got.items():
        torch.testing.assert_close(v, state[k] if k in state else fresh[k], rtol=0, atol=0, msg=k)


def _fresh(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def test_offline_without_cache_fails_when_the_model_is_built(tmp_path, monkeypatch):
    """A shipped config, offline, empty cache: the Runner refuses to start, before any dataset is touched (the
    data root does not even exist), with one message naming the cache and the option for a local file."""
    from mmengine.runner import Runner
    cache = offline_hub(monkeypatch, tmp_path / 'hf')
    cfg = Config.fromfile(str(CONFIG_DIR / 'faster-rcnn_r50-kcla_fpn_1x_coco.py'))
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no-such-data')
    cfg.work_dir = str(tmp_path / 'work')
    with pytest.raises(WeightsNotFound) as info:
        Runner.from_cfg(cfg)
    message = str(info.value)
    assert "'resnet50.a1_in1k'" in message and str(cache) in message and 'timm/resnet50.a1_in1k' in message
    assert f'{CFG_OPTION}/path/to/resnet50.safetensors' in message and '\n' not in message


def test_local_trunk_file_loads_the_trunk_and_keeps_attention_fresh(resnet50_file):
    state, path = resnet50_file
    backbone = LayerAttnResNet(arch='resnet50_kcla', init_cfg=dict(type='TimmTrunk', checkpoint=str(path)))
    assert backbone.init_cfg is None  # mmengine's own initialisers never see it
    fresh = _fresh(backbone)
    backbone.init_weights()
    _assert_trunk_loaded(backbone, state, fresh)


def test_timm_training_checkpoint_and_strict_false(resnet50_file, tmp_path):
    """timm train.py's container (with `args`, read weights_only); strict=False takes what fits a deep stem."""
    state, _ = resnet50_file
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'arch': 'resnet50', 'state_dict': state, 'args': argparse.Namespace(lr=0.1)}, path)
    backbone = LayerAttnResNet(arch='resnet50_as_stages', init_cfg=dict(type='TimmTrunk', checkpoint=str(path)))
    fresh = _fresh(backbone)
    backbone.init_weights()
    _assert_trunk_loaded(backbone, state, fresh)

    fits = r"do not fit .*conv1\.0\.weight.*resnet50c: checkpoint='resnet50c\.gluon_in1k'"
    with pytest.raises(ValueError, match=fits):
        LayerAttnResNet(arch='resnet50_mrlab', init_cfg=dict(type='TimmTrunk', checkpoint=str(path)))
    loose = LayerAttnResNet(arch='resnet50_mrlab', init_cfg=dict(type='TimmTrunk', checkpoint=str(path), strict=False))
    fresh = _fresh(loose)
    loose.init_weights()
    got = loose.model.state_dict()
    assert torch.equal(got['layer3.2.conv2.weight'], state['layer3.2.conv2.weight'])
    assert torch.equal(got['conv1.0.weight'], fresh['conv1.0.weight'])  # the deep stem stays at init


def test_hub_weights_from_the_cache_through_a_shipped_config(resnet50_file, tmp_path, monkeypatch):
    """The shipped checkpoint name resolves through timm's pretrained cfg to the cached Hub file, offline."""
    from mmdet.registry import MODELS
    state, path = resnet50_file
    cache = offline_hub(monkeypatch, tmp_path / 'hf')
    add_to_hub_cache(cache, 'timm/resnet50.a1_in1k', {'model.safetensors': path})
    cfg = Config.fromfile(str(CONFIG_DIR / 'mask-rcnn_r50-mrlal_fpn_1x_coco.py'))
    assert cfg.model.backbone.init_cfg == dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k')
    init_default_scope('mmdet')
    detector = MODELS.build(cfg.model)
    fresh = _fresh(detector.backbone)
    detector.backbone.init_weights()
    _assert_trunk_loaded(detector.backbone, state, fresh)


def test_registered_for_mmengine_and_usable_on_any_timm_resnet(resnet50_file):
    """`TimmTrunk` is an mmengine init type in every scope; on a plain module it loads into the module itself."""
    from mmdet.registry import WEIGHT_INITIALIZERS as MMDET_INITS
    from mmengine.model.weight_init import initialize
    from mmengine.registry import WEIGHT_INITIALIZERS
    state, path = resnet50_file
    assert WEIGHT_INITIALIZERS.get('TimmTrunk') is TimmTrunkInit and MMDET_INITS.get('TimmTrunk') is TimmTrunkInit
    model = timm.create_model('resnet50_mrlal', num_classes=0)
    initialize(model, dict(type='TimmTrunk', checkpoint=str(path)))
    assert torch.equal(model.state_dict()['layer4.2.bn3.weight'], state['layer4.2.bn3.weight'])


@pytest.mark.parametrize('init_cfg,match', [
    (dict(type='TimmTrunk'), 'takes checkpoint'),
    (dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k', prefix='x'), 'takes checkpoint'),
    (dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k', strict='yes'), 'strict must be'),
    ([dict(type='TimmTrunk', checkpoint='x'), dict(type='Pretrained', checkpoint='y')], 'at most one'),
])
def test_bad_trunk_init_cfgs_are_refused(init_cfg, match):
    with pytest.raises(ValueError, match=match):
        LayerAttnResNet(arch='resnet50_mrlal', init_cfg=init_cfg)


@pytest.mark.parametrize('checkpoint,match', [
    ('/nowhere/resnet50.safetensors', 'file not found: /nowhere/resnet50.safetensors'),
    ('resnet50.no_such_tag', "no such tag for resnet50"),
    ('not_a_model', 'neither a file nor a timm model name'),
    ('local-dir:/nowhere', 'holds none of model.safetensors'),
])
def test_bad_trunk_sources_fail_at_build(checkpoint, match):
    with pytest.raises(WeightsNotFound, match=match):
        LayerAttnResNet(arch='resnet50_mrlal', init_cfg=dict(type='TimmTrunk', checkpoint=checkpoint))


def test_pretrained_paths_are_checked_at_build_too(tmp_path, monkeypatch):
    """`Pretrained` (layer-attention weights) also fails at construction: missing file, or Hub offline uncached."""
    with pytest.raises(WeightsNotFound, match='backbone checkpoint not found'):
        LayerAttnResNet(arch='resnet50_mrlal', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'x.pth')))
    cache = offline_hub(monkeypatch, tmp_path / 'hf')
    with pytest.raises(WeightsNotFound, match=f'not in the cache {cache}'):
        LayerAttnResNet(arch='resnet50_mrlal', init_cfg=dict(type='Pretrained', checkpoint='hf-hub:acme/none'))
