"""`LayerAttnResNet` as an MMDetection backbone: features, freezing, norms, checkpointing, weight loading."""
import logging

import pytest
import torch

pytest.importorskip('mmcv.ops')

import timm  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import timm_layerattn.det as det  # noqa: E402
from timm_layerattn.det import LayerAttnResNet  # noqa: E402
from _official import official_from_model  # noqa: E402

pytestmark = pytest.mark.det

ARCHS = ('resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab')
STAGE_PREFIXES = ('layer1.', 'layer2.', 'layer3.', 'layer4.')


def _batch(h: int = 64, w: int = 96, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, h, w)


@pytest.mark.parametrize('arch', ARCHS)
def test_features_have_fpn_strides_and_channels(arch):
    backbone = LayerAttnResNet(arch=arch).eval()
    x = _batch(64, 96, 1)
    with torch.no_grad():
        feats = backbone(x)
        reference = timm.create_model(arch, num_classes=0)
        reference.load_state_dict(backbone.model.state_dict())
        last = reference.eval().forward_features(x)
    assert isinstance(feats, tuple) and len(feats) == 4
    assert [f.shape[1] for f in feats] == backbone.out_channels == [256, 512, 1024, 2048]
    assert backbone.strides == [4, 8, 16, 32]
    assert [(f.shape[2], f.shape[3]) for f in feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]
    # The last feature is the classifier trunk's output: the attention state crossed every stage boundary.
    torch.testing.assert_close(feats[-1], last)


def test_out_indices_select_stages_and_prune_the_rest():
    full = LayerAttnResNet(arch='resnet50_kcla').eval()
    part = LayerAttnResNet(arch='resnet50_kcla', out_indices=(1, 2)).eval()
    assert len(part.model.layer4) == 0 and part._pruned_stages == ('layer4',)
    part.model.load_state_dict({k: v for k, v in full.model.state_dict().items() if not k.startswith('layer4.')})
    x = _batch(64, 64, 1)
    with torch.no_grad():
        want, got = full(x), part(x)
    assert part.out_channels == [512, 1024] and part.strides == [8, 16]
    torch.testing.assert_close(got, want[1:3])


@pytest.mark.parametrize('kwargs', [
    dict(out_indices=(0, 4)), dict(out_indices=(2, 1)), dict(out_indices=()), dict(frozen_stages=5),
    dict(frozen_stages=-2), dict(style='caffe'), dict(norm_cfg=dict(type='GN', num_groups=32)),
    dict(norm_cfg=dict(type='BN', affine=False)), dict(num_classes=10),
    dict(pretrained=True, init_cfg=dict(type='Kaiming')),
    dict(init_cfg=dict(type='Pretrained')),
    dict(out_indices=(0.5, 1)), dict(out_indices=3), dict(frozen_stages=1.5),
    dict(norm_cfg=dict(type='BN', eps=0.)), dict(norm_cfg=dict(type='BN', momentum=1.5)),
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        LayerAttnResNet(arch='resnet50_mrlal', **kwargs)


def test_pretrained_true_without_weights_is_refused():
    with pytest.raises(RuntimeError, match='No pretrained weights'):  # timm's own check
        LayerAttnResNet(arch='resnet50_mrlal', pretrained=True)


@pytest.mark.parametrize('arch,frozen_stages,frozen', [
    ('resnet50_kcla', 1, ('conv1.', 'bn1.', 'layer1.')),
    ('resnet50_mrlab', 0, ('conv1.', 'bn1.')),  # deep stem: conv1 is a Sequential with its own BNs
    ('resnet50_mrlal', 2, ('conv1.', 'bn1.', 'layer1.', 'layer2.')),
])
def test_frozen_stages_have_no_grad_and_stay_in_eval(arch, frozen_stages, frozen):
    backbone = LayerAttnResNet(arch=arch, frozen_stages=frozen_stages, norm_eval=False).train()
    feats = backbone(_batch())
    sum(f.float().mean() for f in feats).backward()
    for name, p in backbone.model.named_parameters():
        if name.startswith(frozen):
            assert not p.requires_grad and p.grad is None, name
        else:  # also shows that no parameter is unused (DDP needs no find_unused_parameters)
            assert p.requires_grad and p.grad is not None, name
    for name, m in backbone.model.named_modules():
        if name and (name + '.').startswith(frozen):
            assert not m.training, name
        elif name.startswith(STAGE_PREFIXES):
            assert m.training, name
    if frozen_stages >= 1:  # the attention modules of a frozen stage are frozen with it
        attn = backbone.model.layer1[0].attn
        assert attn is not None and not attn.training
        assert all(not p.requires_grad for p in attn.parameters())
    # Switching modes again keeps the frozen part frozen.
    backbone.eval().train()
    assert not backbone.model.conv1.training and not any(p.requires_grad for p in backbone.model.bn1.parameters())


def _running_stats(module: torch.nn.Module):
    return {n: b.clone() for n, b in module.named_buffers() if 'running' in n}


@pytest.mark.parametrize('arch', ('resnet50_kcla', 'resnet50_mrlal'))
def test_norm_eval_keeps_every_batchnorm_fixed(arch):
    backbone = LayerAttnResNet(arch=arch, norm_eval=True).train()
    bns = {n: m for n, m in backbone.named_modules() if isinstance(m, _BatchNorm)}
    assert any('.attn.' in n for n in bns)  # attention BatchNorms are covered too
    assert not any(m.training for m in bns.values())
    assert backbone.model.layer2[0].training and backbone.model.layer2[0].attn.training
    before = _running_stats(backbone)
    backbone(_batch())
    after = _running_stats(backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)

    moving = LayerAttnResNet(arch=arch, norm_eval=False).train()
    before = _running_stats(moving)
    moving(_batch())
    after = _running_stats(moving)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any('.attn.' in k for k in changed) and 'model.bn1.running_mean' in changed


def test_norm_cfg_syncbn_and_requires_grad():
    plain = LayerAttnResNet(arch='resnet50_kcla')
    n_bn = sum(isinstance(m, _BatchNorm) for m in plain.modules())
    sync = LayerAttnResNet(arch='resnet50_kcla', norm_cfg=dict(type='SyncBN', requires_grad=False, momentum=0.01))
    syncs = [m for m in sync.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(syncs) == n_bn and not any(isinstance(m, torch.nn.BatchNorm2d) for m in sync.modules())
    assert all(m.momentum == 0.01 and not m.weight.requires_grad for m in syncs)
    assert all(p.requires_grad for n, p in sync.named_parameters() if n.endswith('conv2.weight'))
    with torch.no_grad():
        feats = sync.eval()(_batch(32, 32, 1))
    assert feats[-1].shape == (1, 2048, 1, 1)


def test_with_cp_gives_the_same_outputs_and_grads():
    torch.manual_seed(0)
    ref = LayerAttnResNet(arch='resnet50_kcla', drop_path_rate=0., norm_eval=False).train()
    cp = LayerAttnResNet(arch='resnet50_kcla', drop_path_rate=0., norm_eval=False, with_cp=True).train()
    cp.load_state_dict(ref.state_dict())
    assert cp.model.layer3.grad_checkpointing
    x = _batch(32, 32)
    out_ref, out_cp = ref(x), cp(x)
    torch.testing.assert_close(out_cp, out_ref)
    sum(f.mean() for f in out_ref).backward()
    sum(f.mean() for f in out_cp).backward()
    grads = dict(cp.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_drop_path_rate_reaches_the_attention_branch():
    def rates(backbone):
        return {m.drop_prob for m in backbone.modules() if type(m).__name__ == 'DropPath'}
    assert rates(LayerAttnResNet(arch='resnet50_kcla', drop_path_rate=0.2)) == {0.2}
    assert rates(LayerAttnResNet(arch='resnet50_kcla', drop_path_rate=0.05)) == {0.05}
    assert rates(LayerAttnResNet(arch='resnet50_mrlal', drop_path_rate=0.)) <= {0.}


def _assert_same_trunk(backbone: LayerAttnResNet, state_dict, skip=('fc.',)):
    got = backbone.model.state_dict()
    for k, v in state_dict.items():
        if not k.startswith(skip):
            assert torch.equal(got[k], v), k


def _classifier_state(arch: str, seed: int = 1):
    torch.manual_seed(seed)
    return timm.create_model(arch).state_dict()


def test_pretrained_init_cfg_loads_safetensors_and_skips_pruned_stages(tmp_path):
    state = _classifier_state('resnet50_kcla')
    path = tmp_path / 'resnet50_kcla.safetensors'
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = LayerAttnResNet(
        arch='resnet50_kcla', out_indices=(0, 1, 2), init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    assert backbone.init_cfg is None  # mmengine's own PretrainedInit never sees it
    backbone.init_weights()
    _assert_same_trunk(backbone, state, skip=('fc.', 'layer4.'))
    assert backbone.is_init


def test_official_mrla_training_checkpoint_loads(tmp_path):
    """The official MRLA configs point at training files like r50_mrlal_77.75.pth.tar (`module.` keys)."""
    torch.manual_seed(2)
    model = timm.create_model('resnet50_mrlal')
    official = official_from_model(model, 'imagenet', 'mrla_light', 50)
    path = tmp_path / 'r50_mrlal_77.75.pth.tar'
    torch.save({'epoch': 99, 'arch': 'mrla_light', 'best_acc1': 77.75,
                'state_dict': {'module.' + k: v for k, v in official.items()}}, path)
    backbone = LayerAttnResNet(arch='resnet50_mrlal', pretrained=str(path))
    backbone.init_weights()
    _assert_same_trunk(backbone, model.state_dict())


def test_detector_checkpoint_with_prefix_loads_weights_only(tmp_path):
    """A backbone taken from a detector checkpoint saved by mmengine (meta holding a HistoryBuffer)."""
    source = LayerAttnResNet(arch='resnet50_mrlab')
    torch.nn.init.normal_(source.model.conv1[0].weight)
    buffer = HistoryBuffer()
    buffer.update(1.5)
    path = tmp_path / 'epoch_12.pth'
    torch.save({'meta': {'iter': 3}, 'message_hub': {'log_scalars': {'train/loss': buffer}},
                'state_dict': {'backbone.' + k: v for k, v in source.state_dict().items()}}, path)
    with pytest.raises(Exception):  # plain torch.load (weights_only by default) refuses the file
        torch.load(path)
    target = LayerAttnResNet(
        arch='resnet50_mrlab', init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    target.init_weights()
    _assert_same_trunk(target, source.model.state_dict())
    with pytest.raises(ValueError, match='prefix'):
        LayerAttnResNet(arch='resnet50_mrlab', pretrained=str(path)).load_weights(str(path), prefix='neck.')


def test_local_dir_weights_both_ways(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model('resnet50_mrlal')
    timm.models.save_for_hf(model, str(tmp_path / 'export'), safe_serialization=True)
    via_init = LayerAttnResNet(arch='resnet50_mrlal', pretrained=f'local-dir:{tmp_path / "export"}')
    via_init.init_weights()
    _assert_same_trunk(via_init, model.state_dict())
    via_timm = LayerAttnResNet(arch=f'local-dir:{tmp_path / "export"}', pretrained=True)
    _assert_same_trunk(via_timm, model.state_dict())
    via_timm.init_weights()  # must not re-initialise what timm loaded
    _assert_same_trunk(via_timm, model.state_dict())


def test_hf_hub_source_from_the_cache_offline(tmp_path, monkeypatch):
    """`hf-hub:ORG/NAME@REV` resolves through huggingface_hub's cache (offline here) when the backbone is built."""
    from _det_utils import add_to_hub_cache, offline_hub
    state = _classifier_state('resnet50_mrlal', seed=4)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'model.safetensors'))
    cache = offline_hub(monkeypatch, tmp_path / 'hf')
    add_to_hub_cache(cache, 'acme/x', {'model.safetensors': tmp_path / 'model.safetensors'}, revision='v1')
    backbone = LayerAttnResNet(arch='resnet50_mrlal', init_cfg=dict(type='Pretrained', checkpoint='hf-hub:acme/x@v1'))
    backbone.init_weights()
    _assert_same_trunk(backbone, state)


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.safetensors'):
        LayerAttnResNet(arch='resnet50_kcla', pretrained=str(tmp_path / 'nowhere.safetensors')).init_weights()
    path = tmp_path / 'mrlal.safetensors'
    save_file(_classifier_state('resnet50_mrlal'), str(path))
    wrong = LayerAttnResNet(arch='resnet50_kcla', pretrained=str(path))
    before = {k: v.clone() for k, v in wrong.model.state_dict().items()}
    with pytest.raises(ValueError, match='missing keys: .*attn.*unexpected keys: .*lambda_t'):
        wrong.init_weights()
    # Released KCLA ImageNet code uses head dim 64, the registered models the paper's 32.
    path = tmp_path / 'kcla64.safetensors'
    save_file(timm.create_model('resnet50_kcla', head_dim=64).state_dict(), str(path))
    with pytest.raises(ValueError, match='shape mismatches: .*norm_d.*head_dim=64'):
        LayerAttnResNet(arch='resnet50_kcla', pretrained=str(path)).init_weights()
    LayerAttnResNet(arch='resnet50_kcla', head_dim=64, pretrained=str(path)).init_weights()
    # NaN weights are refused, naming the file and the tensor.
    nan = timm.create_model('resnet50_kcla').state_dict()
    nan['layer1.0.conv1.weight'][0] = float('nan')
    path = tmp_path / 'nan.safetensors'
    save_file(nan, str(path))
    with pytest.raises(RuntimeError, match=r'nan\.safetensors.*NaN.*layer1\.0\.conv1\.weight'):
        LayerAttnResNet(arch='resnet50_kcla', pretrained=str(path)).init_weights()
    # Nothing was copied from the checkpoints that did not fit.
    assert all(torch.equal(v, before[k]) for k, v in wrong.model.state_dict().items())


def test_init_weights_runs_once(caplog):
    backbone = LayerAttnResNet(arch='resnet50_mrlal', init_cfg=dict(type='Constant', val=0.5, layer='Conv2d'))
    backbone.init_weights()
    assert torch.all(backbone.model.conv1.weight == 0.5)
    torch.nn.init.zeros_(backbone.model.conv1.weight)
    with caplog.at_level(logging.WARNING):
        backbone.init_weights()
    assert torch.all(backbone.model.conv1.weight == 0)


def test_registered_in_mmdet_models():
    from mmdet.registry import MODELS
    backbone = MODELS.build(dict(type='LayerAttnResNet', arch='resnet50_mrlal', out_indices=(3,)))
    assert isinstance(backbone, det.LayerAttnResNet) and backbone.out_channels == [2048]
    headless = timm.create_model('resnet50_mrlal', num_classes=0)
    assert sum(p.numel() for p in backbone.parameters()) == sum(p.numel() for p in headless.parameters())


class _SneakyGetattr:
    """Pickles as `getattr(HistoryBuffer, '_set_default_statistics')`: a private attribute."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '_set_default_statistics')


def test_mmengine_loader_allows_only_what_runner_checkpoints_need(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint
    buffer = HistoryBuffer()
    buffer.update(2.0)
    good = tmp_path / 'good.pth'
    torch.save({'message_hub': {'log_scalars': {'train/loss': buffer}}, 'state_dict': {}}, good)
    assert _load_checkpoint(str(good), map_location='cpu')['message_hub']['log_scalars']['train/loss'].current() == 2.0
    bad = tmp_path / 'bad.pth'
    torch.save({'meta': _SneakyGetattr()}, bad)
    with pytest.raises(Exception, match='is not allowed in an mmengine checkpoint'):
        _load_checkpoint(str(bad), map_location='cpu')
    with pytest.raises(Exception):  # outside mmengine's loaders nothing extra is allowed
        torch.load(good)
