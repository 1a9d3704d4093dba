"""Export to Hub-ready folders, model cards, the `export` / `push --dry-run` commands, pretrained registration."""
import argparse
import json
import string
from pathlib import Path, PurePosixPath

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import timm_layerattn
from timm_layerattn import export_folder, register_pretrained, unregister_pretrained
from timm_layerattn._utils.errors import UserError
from timm_layerattn.cli import main as cli_main
from timm_layerattn.hub import CARD_TAGS, card_families, card_template_path, model_family
from timm_layerattn.pretrained import PretrainedWeightsError
from timm_layerattn.tools.zoo import count_macs, count_params

from _layer_attn import trained_like

NAME = 'cifar_resnet20_kcla'


def _trained_like(name: str = NAME, seed: int = 0, **kwargs) -> torch.nn.Module:
    return trained_like(name, seed, **kwargs)


def _x(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    model = _trained_like()
    out = tmp_path_factory.mktemp('export') / 'kcla20'
    export_folder(model, out, model_name=NAME, tag='mylab_cifar10', dataset='cifar10',
                  metrics={'top1': 91.37, 'top5': 99.71}, label_names=[f'class{i}' for i in range(10)],
                  recipe='SGD momentum 0.9, lr 0.1, 300 epochs')
    return model, out


def test_export_folder_files_and_config(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in out.parent.iterdir() if p.name.startswith('.')], 'temporary folders left behind'
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == NAME and config['num_classes'] == 10 and config['num_features'] == 256
    assert config['label_names'] == [f'class{i}' for i in range(10)]
    cfg = config['pretrained_cfg']
    assert cfg['tag'] == 'mylab_cifar10' and cfg['input_size'] == [3, 32, 32] and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == list(model.pretrained_cfg['mean']) and cfg['classifier'] == 'fc'
    assert config['timm_layerattn']['family'] == 'kcla'
    weights = safetensors.torch.load_file(str(out / 'model.safetensors'))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_local_dir_reload_is_bit_identical(exported):
    model, out = exported
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = _x(model)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert reloaded.pretrained_cfg['label_names'] == [f'class{i}' for i in range(10)]
    # the single-file route through the registry cfg, with the model's own filter
    by_file = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))
    with torch.no_grad():
        assert torch.equal(by_file.eval()(x), model(x))


def test_local_dir_adapts_classes_and_channels(exported):
    model, out = exported
    five = timm.create_model(f'local-dir:{out}', pretrained=True, num_classes=5).eval()
    assert five.fc.out_features == 5
    x = _x(model)
    with torch.no_grad():
        assert torch.equal(five.forward_features(x), model.forward_features(x))
    grey = timm.create_model(f'local-dir:{out}', pretrained=True, in_chans=1).eval()
    src = model.state_dict()
    assert torch.equal(grey.conv1.weight, src['conv1.weight'].sum(1, keepdim=True))
    assert all(torch.equal(v, src[k]) for k, v in grey.state_dict().items() if k != 'conv1.weight')


def test_model_card(exported):
    model, out = exported
    card = ModelCard.load(out / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.license == 'apache-2.0'
    assert data.pipeline_tag == 'image-classification'
    assert set(CARD_TAGS) <= set(data.tags) and 'transformers' not in data.tags
    assert data.datasets == ['uoft-cs/cifar10'] and data.metrics == ['accuracy']
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results == {'Top-1 accuracy': 91.37, 'Top-5 accuracy': 99.71}
    assert {r.dataset_type for r in data.eval_results} == {'uoft-cs/cifar10'}
    assert {r.dataset_split for r in data.eval_results} == {'test'}
    body = card.text
    params = count_params(model)
    gmacs = count_macs(timm.create_model(NAME, device='meta'), (3, 32, 32)) / 1e9
    assert f'{params:,}' in body and f'{gmacs:.3f} at 3x32x32' in body
    usage = body[body.index('```python'):]
    assert usage.splitlines()[1].startswith('import timm, timm_layerattn  # ')
    assert "hf-hub:<your-org>/cifar_resnet20_kcla.mylab_cifar10" in usage
    assert 'SGD momentum 0.9, lr 0.1, 300 epochs' in body
    assert '| CIFAR-10 test | Top-1 accuracy | 91.37 |' in body
    assert '@article{xiong2026kcla' in body and 'github.com/bgx666/KCLA' in body
    assert '$' not in body.replace('$$', '')  # every template placeholder was filled


def test_card_without_results_or_dataset(tmp_path):
    model = _trained_like('cifar_resnet56', num_classes=100)
    out = export_folder(model, tmp_path / 'r56', model_name='cifar_resnet56')
    card = ModelCard.load(out / 'README.md')
    assert card.data.datasets is None and not card.data.eval_results
    assert 'No evaluation results were given' in card.text and 'bottleneck' in card.text
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg'].get('tag') is None


@pytest.mark.parametrize('family', card_families())
def test_card_templates(family):
    text = card_template_path(family).read_text()
    values = dict(title='T', model_name='m.t', arch='m', repo_id='o/m.t', details='D', usage='U', recipe='R',
                  results='X')
    body = string.Template(text).substitute(values)  # raises on unknown or malformed placeholders
    for section in ('## Model Details', '## Model Usage', '## Training', '## Results', '## Citation', '```bibtex'):
        assert section in body, section
    assert '### Reported' in body


@pytest.mark.parametrize('name,family', [
    ('resnet50_kcla', 'kcla'), ('cifar_resnet110_kcla', 'kcla'), ('resnet101_mrlal', 'mrla_l'),
    ('cifar_resnet20_mrlab', 'mrla_b'), ('cifar_resnet56', 'cifar_resnet'), ('resnet50_as_kv', 'attention_shortcuts'),
    ('cifar_resnet50_as_stages', 'attention_shortcuts'), ('cifar_resnet50', 'attention_shortcuts'),
    ('resnet50_plain', 'attention_shortcuts'), ('cifar_resnet50_half', 'attention_shortcuts'),
    ('cifar_resnet20_basic', 'cnntention'), ('cifar_resnet20_basic_mha', 'cnntention'),
    ('resnet18_gradattn_rope', 'gradattn'),
])
def test_model_family(name, family):
    assert model_family(name) == family


def test_every_registered_model_has_a_card():
    for name in timm_layerattn.models.list_models():
        assert card_template_path(model_family(name)).is_file()
    with pytest.raises(UserError):
        model_family('resnet50')


# ---------------------------------------------------------------------------------------------------------------
# timm-layerattn export
# ---------------------------------------------------------------------------------------------------------------

def _cli(capsys, *args):
    rc = cli_main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


def _same_weights(folder: Path, model: torch.nn.Module) -> bool:
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).state_dict()
    src = model.state_dict()
    return reloaded.keys() == src.keys() and all(torch.equal(reloaded[k], v) for k, v in src.items())


def test_cli_export_training_checkpoint(tmp_path, capsys):
    """Raw weights by default (timm's validate.py without --use-ema), EMA with --use-ema; `module.` stripped."""
    model, ema = _trained_like('cifar_resnet20_mrlab', seed=1, num_classes=100), _trained_like(
        'cifar_resnet20_mrlab', seed=2, num_classes=100)
    ckpt = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 10, 'arch': 'cifar_resnet20_mrlab', 'best_acc1': torch.tensor(70.0),
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'state_dict_ema': ema.state_dict()}, ckpt)
    metrics = tmp_path / 'metrics.json'
    metrics.write_text('{"top1": 70.25}')
    labels = tmp_path / 'labels.txt'
    labels.write_text('\n'.join(f'c{i}' for i in range(100)))
    rc, out, err = _cli(capsys, 'export', 'cifar_resnet20_mrlab', '--checkpoint', ckpt, '--out', tmp_path / 'ema',
                        '--dataset', 'cifar100', '--metrics', f'@{metrics}', '--label-names', labels, '--use-ema')
    assert rc == 0, err
    assert "loaded 'state_dict_ema' of a training checkpoint, epoch 10" in out
    reloaded = timm.create_model(f'local-dir:{tmp_path / "ema"}', pretrained=True)
    assert reloaded.num_classes == 100 and reloaded.pretrained_cfg['tag'] == 'cifar100'
    assert _same_weights(tmp_path / 'ema', ema)
    assert ModelCard.load(tmp_path / 'ema' / 'README.md').data.eval_results[0].metric_value == 70.25
    for flags, name in (([], 'default'), (['--no-ema'], 'raw')):
        rc, out, err = _cli(capsys, 'export', 'cifar_resnet20_mrlab', '--checkpoint', ckpt, '--out', tmp_path / name,
                            *flags, '--tag', name)
        assert rc == 0, err
        assert "loaded 'state_dict' of a training checkpoint" in out and '--use-ema takes those' in out, out
        assert _same_weights(tmp_path / name, model), flags
    rc, _, err = _cli(capsys, 'export', 'cifar_resnet20_mrlab', '--checkpoint', ckpt, '--out', tmp_path / 'x',
                      '--use-ema', '--no-ema')
    assert rc == 2 and 'not allowed with argument' in err and not (tmp_path / 'x').exists()


def _saver_checkpoints(tmp_path: Path, saver_factory, name: str = NAME):
    """Files written by a real checkpoint saver (timm's `CheckpointSaver` or ours) with an EMA model."""
    from timm.utils import ModelEmaV3
    model = _trained_like(name, seed=3)
    ema = ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        for k, v in ema.module.state_dict().items():
            # the EMA weights differ from the raw ones everywhere, except in the KCLA temperatures (`norm_d`), which
            # the architecture fixes: a checkpoint holding others is refused (docs/design/layer_attention.md)
            if v.is_floating_point() and not k.endswith('norm_d'):
                v.add_(0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model=name, lr=0.1, epochs=3, output=str(tmp_path))
    run = tmp_path / 'run'
    run.mkdir()
    saver = saver_factory(model=model, optimizer=optimizer, args=args, model_ema=ema, checkpoint_dir=str(run),
                          recovery_dir=str(run), max_history=2)
    saver.save_checkpoint(0, metric=41.5)
    saver.save_checkpoint(1, metric=45.0)
    return run, model, ema.module


def test_cli_export_timm_train_py_checkpoint(tmp_path, capsys):
    """timm train.py's files (args as an argparse.Namespace) load with weights_only=True; raw weights by default."""
    from timm.utils import CheckpointSaver
    run, model, ema = _saver_checkpoints(tmp_path, CheckpointSaver)
    assert isinstance(torch.load(run / 'model_best.pth.tar', weights_only=False)['args'], argparse.Namespace)
    for file in ('model_best.pth.tar', 'last.pth.tar'):
        rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', run / file, '--out', tmp_path / file)
        assert rc == 0, err
        assert "loaded 'state_dict' of a timm train.py checkpoint, epoch 1 (it also holds EMA weights" in out, out
        assert _same_weights(tmp_path / file, model)
    rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', run / 'model_best.pth.tar', '--out', tmp_path / 'e',
                        '--use-ema')
    assert rc == 0, err
    assert "loaded 'state_dict_ema' of a timm train.py checkpoint, epoch 1:" in out
    assert _same_weights(tmp_path / 'e', ema) and not _same_weights(tmp_path / 'e', model)


def test_cli_export_trainer_checkpoint(tmp_path, capsys):
    from timm_layerattn.train.checkpoint import create_saver
    run, model, ema = _saver_checkpoints(tmp_path, create_saver)
    rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', run / 'model_best.pth.tar', '--out', tmp_path / 'r')
    assert rc == 0, err
    assert "'state_dict' of a timm-layerattn train checkpoint, epoch 1" in out
    assert _same_weights(tmp_path / 'r', model)
    rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', run / 'last.pth.tar', '--out', tmp_path / 'e',
                        '--use-ema')
    assert rc == 0, err
    assert _same_weights(tmp_path / 'e', ema)


def test_cli_export_refuses_missing_ema_and_other_archs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short paths: the one-line errors are cut at 200 characters
    tmp_path = Path('.')
    model = _trained_like()
    torch.save({'epoch': 2, 'arch': NAME, 'state_dict': model.state_dict()}, tmp_path / 'plain.pth.tar')
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    torch.save({'epoch': 2, 'arch': 'cifar_resnet20_mrlab', 'state_dict': model.state_dict()}, tmp_path / 'other.pth')
    for file, flags, reason in (('plain.pth.tar', ['--use-ema'], 'plain.pth.tar: --use-ema, but it holds no EMA '
                                 'weights (state_dict_ema / model_ema / ema); its keys: arch, epoch, state_dict'),
                                ('w.safetensors', ['--use-ema'], 'holds no EMA weights'),
                                ('other.pth', [], "is a checkpoint of 'cifar_resnet20_mrlab' (its 'arch' entry), "
                                 "not of 'cifar_resnet20_kcla'")):
        rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', tmp_path / file, '--out', tmp_path / 'o', *flags)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and reason in err, (file, err)
        assert not (tmp_path / 'o').exists()


def test_cli_export_refuses_other_kcla_temperatures_in_one_line(tmp_path, capsys):
    """A checkpoint whose keys and shapes fit but whose fixed KCLA temperatures are not the model's: a user error
    that names the key and the `temperatures` to build with, nothing written."""
    model = _trained_like()
    equal = {k: (torch.ones_like(v) if k.endswith('norm_d') else v) for k, v in model.state_dict().items()}
    torch.save({'state_dict': equal}, tmp_path / 'equal.pth')
    rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', tmp_path / 'equal.pth', '--out', tmp_path / 'o')
    assert rc == 2 and 'internal error' not in err, err
    assert "norm_d: the checkpoint's KCLA temperatures are not this model's" in err
    assert "build it with temperatures='equal'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('trunk_prefix', ['model.', ''])
def test_cli_export_detector_checkpoint(tmp_path, capsys, trunk_prefix):
    """An MMDetection checkpoint: the `backbone.` part (under `model.` for our LayerAttnResNet), no classifier."""
    model = _trained_like(num_classes=0)
    state = {f'backbone.{trunk_prefix}{k}': v for k, v in model.state_dict().items()}
    state.update({'neck.lateral_convs.0.conv.weight': torch.zeros(256, 64, 1, 1),
                  'rpn_head.rpn_cls.weight': torch.zeros(3, 256, 1, 1)})
    meta = {'epoch': 12, 'iter': 7330, 'mmengine_version': '0.10.7',
            'dataset_meta': {'classes': ('person', 'car'), 'palette': [(220, 20, 60), (0, 0, 142)]}}
    torch.save({'meta': meta, 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': []}},
               tmp_path / 'epoch_12.pth')
    rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', tmp_path / 'epoch_12.pth', '--out', tmp_path / 'b')
    assert rc == 0, err
    assert "'state_dict' of an MMDetection / mmengine checkpoint, epoch 12, its 'backbone.' part" in out, out
    assert 'no classifier, num_classes=0' in out and '(0 classes)' in out
    reloaded = timm.create_model(f'local-dir:{tmp_path / "b"}', pretrained=True).eval()
    assert reloaded.num_classes == 0 and _same_weights(tmp_path / 'b', model)
    with torch.no_grad():
        assert torch.equal(reloaded(_x(model)), model(_x(model)))


def _message_hub_checkpoint(path: Path, state_dict) -> None:
    """A checkpoint like mmengine's Runner writes: its message hub holds `HistoryBuffer` objects.

    Without mmengine, a stand-in class under mmengine's module name pickles the same global reference.
    """
    import sys
    import types
    with pytest.MonkeyPatch.context() as mp:
        try:
            from mmengine.logging import HistoryBuffer
        except ImportError:
            HistoryBuffer = type('HistoryBuffer', (), {'__module__': 'mmengine.logging.history_buffer'})
            for name in ('mmengine', 'mmengine.logging', 'mmengine.logging.history_buffer'):
                mp.setitem(sys.modules, name, types.ModuleType(name))
            sys.modules['mmengine.logging.history_buffer'].HistoryBuffer = HistoryBuffer
        loss = HistoryBuffer()
        if hasattr(loss, 'update'):  # the real class: a Runner's buffers hold values when it saves
            loss.update(1.5)
            loss.update(1.25)
        hub = {'log_scalars': {'train/loss': loss}, 'runtime_info': {'epoch': 1, 'iter': 10}}
        torch.save({'meta': {'epoch': 1, 'iter': 10}, 'state_dict': state_dict, 'message_hub': hub}, path)


def test_cli_export_runner_checkpoint_without_mmdet(tmp_path, capsys, monkeypatch):
    """Without MMDetection the message hub cannot be read: one line naming what to install."""
    from timm_layerattn.hub import source as hub_source
    monkeypatch.chdir(tmp_path)  # short paths: the one-line errors are cut at 200 characters
    state = {f'backbone.model.{k}': v for k, v in _trained_like(num_classes=0).state_dict().items()}
    _message_hub_checkpoint(Path('epoch_1.pth'), state)
    monkeypatch.setattr(hub_source, '_mmengine_globals', lambda: None)  # as where MMDetection is missing
    rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', 'epoch_1.pth', '--out', 'o')
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert ('epoch_1.pth: reading an mmengine Runner checkpoint (its message_hub holds '
            'mmengine.logging.history_buffer.HistoryBuffer) needs MMDetection (python '
            'scripts/install_mmcv.py') in err, err
    assert not Path('o').exists()


def test_cli_export_runner_checkpoint(tmp_path, capsys):
    """With MMDetection installed, a Runner checkpoint (message hub and all) exports with weights_only=True."""
    pytest.importorskip('mmcv.ops')
    pytest.importorskip('timm_layerattn.det')
    model = _trained_like(num_classes=0)
    _message_hub_checkpoint(tmp_path / 'epoch_1.pth', {f'backbone.model.{k}': v for k, v in model.state_dict().items()})
    rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', tmp_path / 'epoch_1.pth', '--out', tmp_path / 'b')
    assert rc == 0, err
    assert "MMDetection / mmengine checkpoint, epoch 1, its 'backbone.' part" in out
    assert _same_weights(tmp_path / 'b', model)


def test_cli_export_safetensors_and_overwrite(tmp_path, capsys):
    model = _trained_like('cifar_resnet20_kcla', head_dim=8)  # a non-default KCLA head dim, read from norm_d
    src = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(src))
    out = tmp_path / 'out'
    args = ['export', NAME, '--checkpoint', src, '--out', out]
    rc, text, err = _cli(capsys, *args)
    assert rc == 0, err
    assert 'KCLA head_dim 8' in text
    assert json.loads((out / 'config.json').read_text())['model_args']['head_dim'] == 8
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = _x(model)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    rc, _, err = _cli(capsys, *args)
    assert rc == 2 and 'already exists' in err
    assert _cli(capsys, *args, '--overwrite', '--tag', 'second')[0] == 0
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['tag'] == 'second'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'w.safetensors']


def _bad_checkpoints(tmp: Path):
    good = timm.create_model(NAME).state_dict()
    torch.save(good, tmp / 'good.pth')
    safetensors.torch.save_file(good, str(tmp / 'good.safetensors'))
    data = (tmp / 'good.pth').read_bytes()
    (tmp / 'truncated.pth').write_bytes(data[: len(data) // 2])
    st = (tmp / 'good.safetensors').read_bytes()
    (tmp / 'truncated.safetensors').write_bytes(st[: len(st) - 1000])
    (tmp / 'corrupt.pth').write_bytes(b'this is not a checkpoint\n' * 100)
    (tmp / 'empty.pth').write_bytes(b'')
    torch.save({'args': {'output': PurePosixPath('runs/x')}, 'state_dict': good}, tmp / 'pickled.pth')
    wrong = dict(good, **{'layer2.0.conv2.weight': torch.zeros(32, 32, 5, 5)})
    torch.save(wrong, tmp / 'mismatch.pth')
    torch.save({'epoch': 3, 'optimizer': {'lr': 0.1}}, tmp / 'no_tensors.pth')
    return {
        'truncated.pth': 'truncated or corrupt', 'truncated.safetensors': 'truncated or corrupt',
        'corrupt.pth': 'not a torch checkpoint', 'empty.pth': 'empty', 'pickled.pth': 'PurePosixPath',
        'mismatch.pth': 'shape mismatch', 'no_tensors.pth': 'no tensors', 'missing.pth': 'not found',
    }


def test_cli_export_refuses_bad_checkpoints(tmp_path, capsys):
    cases = _bad_checkpoints(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, reason in cases.items():
        rc, out, err = _cli(capsys, 'export', NAME, '--checkpoint', tmp_path / name, '--out', tmp_path / 'out')
        lines = err.strip().splitlines()
        assert rc == 2, name
        assert len(lines) == 1 and lines[0].startswith('timm-layerattn export: error:'), (name, err)
        assert reason in lines[0], (name, lines[0])
        assert 'Traceback' not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == before, f'{name} left files behind'


def test_cli_export_refuses_bad_arguments(tmp_path, capsys):
    ckpt = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(timm.create_model(NAME).state_dict(), str(ckpt))
    for extra, reason in ((['--metrics', '{"top1": 9'], 'not valid JSON'),
                          (['--metrics', '{"top1": "high"}'], 'finite number'),
                          (['--label-names', '["a", "b"]'], '2 label names'),
                          (['--tag', 'bad.tag'], 'invalid tag'),
                          (['--num-classes', '7'], 'shape mismatch')):
        rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', ckpt, '--out', tmp_path / 'o', *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and reason in err, (extra, err)
        assert not (tmp_path / 'o').exists()
    rc, _, err = _cli(capsys, 'export', 'resnet50', '--checkpoint', ckpt, '--out', tmp_path / 'o')
    assert rc == 2 and 'not one of timm_layerattn' in err


def test_export_requires_a_timm_model(tmp_path):
    from timm_layerattn.models.resnet_la import model_cfgs
    from timm_layerattn.models.resnet_trunk import ResNetLA
    with pytest.raises(UserError, match='pretrained_cfg'):
        export_folder(ResNetLA(model_cfgs['resnet50_kcla']), tmp_path / 'x', model_name='resnet50_kcla')
    with pytest.raises(UserError, match='does not match'):
        export_folder(timm.create_model('cifar_resnet20'), tmp_path / 'x', model_name='cifar_resnet20_kcla')
    assert not (tmp_path / 'x').exists()


# ---------------------------------------------------------------------------------------------------------------
# push --dry-run (no network); the real upload is tested against the loopback Hub in test_hub_loading.py
# ---------------------------------------------------------------------------------------------------------------

def test_push_dry_run(exported, capsys, tmp_path):
    _, out = exported
    rc, text, err = _cli(capsys, 'push', out, '--repo-id', 'acme/cifar_resnet20_kcla.mylab_cifar10', '--dry-run',
                         '--private')
    assert rc == 0, err
    assert 'would upload' in text and 'private' in text
    for name in ('config.json', 'model.safetensors', 'README.md'):
        assert name in text
    assert "loads as 'cifar_resnet20_kcla'" in text
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'config.json').write_text('{}')
    rc, _, err = _cli(capsys, 'push', broken, '--repo-id', 'acme/x', '--dry-run')
    assert rc == 2 and 'missing model.safetensors, README.md' in err
    rc, _, err = _cli(capsys, 'push', out, '--repo-id', 'not a repo', '--dry-run')
    assert rc == 2 and 'invalid repo id' in err


# ---------------------------------------------------------------------------------------------------------------
# pretrained=True
# ---------------------------------------------------------------------------------------------------------------

def test_pretrained_without_weights_names_the_ways_to_load():
    with pytest.raises(PretrainedWeightsError) as e:
        timm.create_model('resnet50_mrlab', pretrained=True)
    msg = str(e.value)
    for hint in ("'resnet50_mrlab.untrained'", 'hf-hub:', 'local-dir:', 'pretrained_cfg_overlay=dict(file=',
                 'register_pretrained', 'load_trunk'):
        assert hint in msg, hint


@pytest.fixture
def registered(exported):
    names = []

    def register(name, **kwargs):
        register_pretrained(name, **kwargs)
        names.append(name)
    yield register
    for name in reversed(names):
        unregister_pretrained(name)


def test_register_pretrained_makes_pretrained_true_load(exported, registered):
    model, out = exported
    weights = str(out / 'model.safetensors')
    x = _x(model)
    registered(f'{NAME}.mylab_cifar10', file=weights, label_names=[f'class{i}' for i in range(10)])
    assert f'{NAME}.mylab_cifar10' in timm.list_models(f'{NAME}*', pretrained=True)
    for name in (NAME, f'{NAME}.mylab_cifar10'):
        loaded = timm.create_model(name, pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), name
        assert loaded.pretrained_cfg['tag'] == 'mylab_cifar10'
    # a second tag does not take over the default unless asked to, and inherits nothing from the first
    registered(f'{NAME}.other', file=weights, default=False)
    assert timm.models.get_pretrained_cfg(NAME).tag == 'mylab_cifar10'
    other = timm.create_model(f'{NAME}.other', pretrained=True).pretrained_cfg
    assert other['tag'] == 'other' and other.get('label_names') is None
    registered(f'{NAME}.third', file=weights, default=True)
    assert timm.models.get_pretrained_cfg(NAME).tag == 'third'


def test_unregister_restores_the_untrained_default(exported):
    _, out = exported
    register_pretrained(f'{NAME}.tmp', file=str(out / 'model.safetensors'))
    unregister_pretrained(f'{NAME}.tmp')
    assert timm.models.get_pretrained_cfg(NAME).tag == 'untrained'
    assert f'{NAME}.tmp' not in timm.list_models(f'{NAME}*', include_tags=True)
    with pytest.raises(PretrainedWeightsError):
        timm.create_model(NAME, pretrained=True)


def test_register_pretrained_validation():
    with pytest.raises(ValueError, match='full'):
        register_pretrained(f'{NAME}.x', hf_hub_id='acme/')
    with pytest.raises(ValueError, match='exactly one'):
        register_pretrained(f'{NAME}.x')
    with pytest.raises(ValueError, match='<arch>.<tag>'):
        register_pretrained(NAME, hf_hub_id='acme/x')
    with pytest.raises(ValueError, match='Unknown architecture'):
        register_pretrained('resnet50_nope.x', hf_hub_id='acme/x')
    with pytest.raises(ValueError, match='unsupported fields'):
        register_pretrained(f'{NAME}.x', hf_hub_id='acme/x', weights='y')


def test_atomic_outputs_get_normal_permissions(tmp_path):
    """mkdtemp/mkstemp make private entries; results must follow the umask like any other file."""
    import os
    from timm_layerattn._utils.files import atomic_dir, atomic_file
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / 'out') as d:
            (d / 'sub').mkdir()
            with atomic_file(d / 'sub' / 'f.bin') as f:
                f.write(b'x')
        with atomic_file(tmp_path / 'g.bin') as f:
            f.write(b'y')
    finally:
        os.umask(mask)
    assert (tmp_path / 'out').stat().st_mode & 0o777 == 0o755
    assert (tmp_path / 'out' / 'sub').stat().st_mode & 0o777 == 0o755
    assert (tmp_path / 'out' / 'sub' / 'f.bin').stat().st_mode & 0o777 == 0o644
    assert (tmp_path / 'g.bin').stat().st_mode & 0o777 == 0o644
