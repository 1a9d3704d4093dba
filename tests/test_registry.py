"""Registration, names, parameter counts (spec tables) and import weight."""
import json
import subprocess
import sys

import pytest
import timm
import torch

import timm_layerattn
from timm_layerattn.models import MODEL_MODULES, list_models

CORE_NAMES = {
    'resnet50_kcla', 'resnet101_kcla', 'resnet50_mrlal', 'resnet101_mrlal', 'resnet50_mrlab', 'resnet101_mrlab',
    'cifar_resnet20', 'cifar_resnet56', 'cifar_resnet110',
    *(f'cifar_resnet{d}_{a}' for d in (20, 56, 110) for a in ('kcla', 'mrlal', 'mrlab')),
}

# Parameter counts of the official code (layer_attention.md §6). KCLA: the official count minus its
# frozen `norm_d` (a buffer here) and minus the init-cell tensors that never run (not created here).
PARAMS_IMAGENET = {
    'resnet50_kcla': 25_812_138 - 4_613,  # head dim 32 (paper); 4,613 unused official tensors
    'resnet101_kcla': 45_031_769 - 4_613 - 16_384,  # + layer3.attention.11.adjust_channel
    'resnet50_mrlal': 25_738_452,
    'resnet101_mrlal': 44_939_646,
    'resnet50_mrlab': 25_742_580,
    'resnet101_mrlab': 44_926_366,
}
PARAMS_KCLA_HEAD64 = {'resnet50_kcla': 25_850_133, 'resnet101_kcla': 45_040_324}  # "used" counts, spec §6.1
PARAMS_CIFAR = {  # (10 classes, 100 classes)
    'cifar_resnet20': (220_378, 243_508),
    'cifar_resnet56': (591_322, 614_452),
    'cifar_resnet110': (1_147_738, 1_170_868),
    'cifar_resnet20_kcla': (235_507 - 56 - 643, 258_637 - 56 - 643),
    'cifar_resnet56_kcla': (627_723 - 168 - 643, 650_853 - 168 - 643),
    'cifar_resnet110_kcla': (1_216_047 - 336 - 643, 1_239_177 - 336 - 643),
    'cifar_resnet20_mrlal': (231_182, 254_312),
    'cifar_resnet56_mrlal': (623_734, 646_864),
    'cifar_resnet110_mrlal': (1_212_562, 1_235_692),
    'cifar_resnet20_mrlab': (230_286, 253_416),
    'cifar_resnet56_mrlab': (621_046, 644_176),
    'cifar_resnet110_mrlab': (1_207_186, 1_230_316),
}


def n_params(name: str, **kwargs) -> int:
    model = timm.create_model(name, device='meta', **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_core_names_registered_exactly():
    ours = set(list_models())
    assert CORE_NAMES <= ours
    assert set(timm.list_models('*kcla*')) == {n for n in CORE_NAMES if n.endswith('kcla')}
    assert set(timm.list_models(module=list(MODEL_MODULES))) == ours


def test_names_and_modules_do_not_exist_in_timm_itself():
    """Registering an existing name would silently replace timm's entry (conventions.md §1.1)."""
    code = ('import timm, json; print(json.dumps([[timm.is_model(n) for n in %r], sorted(timm.list_modules())]))'
            % sorted(list_models()))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    exists, timm_modules = json.loads(out)
    assert not any(exists)
    assert not set(MODEL_MODULES) & set(timm_modules)


def test_every_model_has_a_pretrained_cfg():
    tagged = list_models(include_tags=True)
    for name in list_models():
        tags = [t for t in tagged if t.split('.')[0] == name]
        assert tags, name
        cfg = timm.models.get_pretrained_cfg(tags[0])
        assert cfg.hf_hub_id is None or ('/' in cfg.hf_hub_id and not cfg.hf_hub_id.endswith('/'))


@pytest.mark.parametrize('name,expected', PARAMS_IMAGENET.items())
def test_imagenet_param_counts_match_official(name, expected):
    assert n_params(name) == expected


@pytest.mark.parametrize('name,expected', PARAMS_KCLA_HEAD64.items())
def test_kcla_released_code_head_dim(name, expected):
    assert n_params(name, head_dim=64) == expected


@pytest.mark.parametrize('name,expected', PARAMS_CIFAR.items())
def test_cifar_param_counts_match_official(name, expected):
    assert n_params(name) == expected[0]
    assert n_params(name, num_classes=100) == expected[1]


def test_import_is_light():
    code = (
        'import sys, timm_layerattn, timm; '
        'heavy = ("mmdet", "mmcv", "mmengine", "matplotlib", "sklearn", "timm_layerattn.hub", '
        '"timm_layerattn.train", "timm_layerattn.det"); '
        'print(sorted(m for m in sys.modules if m.startswith(heavy)))'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


def test_cli_list_prints_table():
    out = subprocess.run(
        [sys.executable, '-m', 'timm_layerattn', 'list', 'resnet50_*'], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    row = next(l for l in lines if l.startswith('resnet50_kcla '))
    assert '25.808' in row and '224x224' in row
    bad = subprocess.run([sys.executable, '-m', 'timm_layerattn', 'list', 'nothing*'], capture_output=True, text=True)
    assert bad.returncode == 2 and 'no registered model matches' in bad.stderr and 'Traceback' not in bad.stderr
