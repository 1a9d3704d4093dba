"""Registration, names, parameter counts (docs/design/layer_attention.md#la-param-counts) and import weight."""
import json
import subprocess
import sys

import pytest
import timm

import timm_layerattn
from timm_layerattn.models import MODEL_MODULES, list_models

from _layer_attn import n_params

CORE_NAMES = {
    'resnet50_kcla', 'resnet101_kcla', 'resnet50_mrlal', 'resnet101_mrlal', 'resnet50_mrlab', 'resnet101_mrlab',
    *(f'resnet{d}_{a}' for d in (18, 34) for a in ('kcla', 'mrlal', 'mrlab')),
    'cifar_resnet20', 'cifar_resnet56', 'cifar_resnet110',
    *(f'cifar_resnet{d}_{a}' for d in (20, 56, 110) for a in ('kcla', 'mrlal', 'mrlab')),
    *(f'deit_{s}_patch16_224_{a}' for s in ('tiny', 'small', 'base') for a in ('mrlal', 'mrlab')),
    'deit_tiny_patch16_224_kcla', 'deit_small_patch16_224_kcla',
}

# Parameter counts of the official code (docs/design/layer_attention.md#la-param-counts); the KCLA / MRLA
# models' are in tests/test_kcla.py and tests/test_mrla.py.
PARAMS_CIFAR = {  # (10 classes, 100 classes)
    'cifar_resnet20': (220_378, 243_508),
    'cifar_resnet56': (591_322, 614_452),
    'cifar_resnet110': (1_147_738, 1_170_868),
}


def test_core_names_registered_exactly():
    ours = set(list_models())
    assert CORE_NAMES <= ours
    assert set(timm.list_models('*kcla*')) == {n for n in CORE_NAMES if n.endswith('kcla')}
    assert set(timm.list_models(module=list(MODEL_MODULES))) == ours


def test_names_and_modules_do_not_exist_in_timm_itself():
    """Registering an existing name would silently replace timm's entry
    (docs/design/conventions.md#conv-registration)."""
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
