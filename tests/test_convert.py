"""Official checkpoint conversion (`convert_official`, `timm-layerattn convert`) and `load_trunk`.

The official checkpoints come from tests/_official.py (names, shapes and which cells carry the re-init extras,
written from the key tables of docs/design/layer_attention.md independently of the package's renaming rules).
This file holds what is common to the families: the plain CIFAR ResNet's layout and parity, refusals, the CLI,
the CNNtention key map and `load_trunk`. The KCLA / MRLA layouts (pinned to the parameter counts measured with
the official code, #la-param-counts), their parity with `official_forward` of tests/_reference.py and their
family-specific rules are in tests/test_kcla.py and tests/test_mrla.py. The `#la-...` anchors cited in this
file are sections of docs/design/layer_attention.md.
"""
import pytest
import safetensors.torch
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official, load_trunk
from timm_layerattn._utils.errors import UserError
from timm_layerattn.cli import main as cli_main
from timm_layerattn.checkpoints.cnntention import remap_keys as remap_cnntention_keys
from timm_layerattn.models.resnet_la import checkpoint_filter_fn

from _layer_attn import check_official_parity, check_strict_conversion
from _official import CNNTENTION_KEYS, CNNTENTION_TRUNK, materialize, numel, official_cifar20, official_shapes

# ---------------------------------------------------------------------------------------------------------------
# The plain CIFAR ResNet: layout as measured (#la-params-cifar), parity, strict conversion
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('depth,counts', [
    (20, {'plain': 220_378}),
    (56, {'plain': 591_322}),
    (110, {'plain': 1_147_738}),
])
def test_official_cifar_layout_matches_spec_counts(depth, counts):
    for family, total in counts.items():
        assert numel(official_shapes('cifar', family, depth)) == total, family


@pytest.mark.parametrize('model_name,family', [
    ('cifar_resnet20', 'plain'),
])
def test_cifar_parity(model_name, family):
    depth = int(model_name.split('_')[1][len('resnet'):])
    check_official_parity(model_name, 'cifar', family, depth, size=32)


@pytest.mark.parametrize('model_name,family,depth', [
    ('cifar_resnet56', 'plain', 56),
    ('cifar_resnet110', 'plain', 110),
])
def test_strict_conversion_other_architectures(model_name, family, depth):
    """Every remaining official architecture converts and fits the model exactly (checked on the meta device)."""
    check_strict_conversion(model_name, family, depth)


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------

def test_unexpected_key_is_named():
    sd = official_cifar20('mrla_light')
    sd['layer2.1.mrla.mrla.Wx.weight'] = torch.zeros(1, 1, 5)
    with pytest.raises(UserError, match=r'unexpected key.*layer2\.1\.mrla\.mrla\.Wx\.weight'):
        convert_official(sd, 'cifar_resnet20_mrlal')


def test_missing_key_and_shape_mismatch_are_named():
    sd = official_cifar20('kcla')
    del sd['stages.2.1.kcla.head_att.weight']
    with pytest.raises(UserError, match=r'missing key.*layer3\.1\.attn\.head_gate\.weight'):
        convert_official(sd, 'cifar_resnet20_kcla')
    sd = official_cifar20('mrla_base')
    sd['stages.0.1.mrla.mrla.Wv.weight'] = torch.zeros(64, 1, 5, 5)
    with pytest.raises(UserError, match=r'shape mismatch.*stages\.0\.1\.mrla\.mrla\.Wv\.weight'):
        convert_official(sd, 'cifar_resnet20_mrlab')


def test_wrong_family_depth_and_norm_d_are_refused():
    with pytest.raises(UserError, match=r'official kcla checkpoint.*mrla_light'):
        convert_official(official_cifar20('kcla'), 'cifar_resnet20_mrlal')
    with pytest.raises(UserError, match=r"6-6-6 blocks per stage.*use 'cifar_resnet56_mrlab'"):
        convert_official(materialize(official_shapes('cifar', 'mrla_base', 56)), 'cifar_resnet20_mrlab')
    sd = official_cifar20('kcla')
    sd['stages.0.0.kcla.norm_d'] = sd['stages.0.0.kcla.norm_d'] * 1.5
    with pytest.raises(UserError, match='norm_d'):
        convert_official(sd, 'cifar_resnet20_kcla')
    dla = {'stages.0.lstm.w_ih.0.seq.0.weight': torch.zeros(16, 64),
           'stages.0.attention.0.bn_layer_attention.weight': torch.zeros(64),
           'stages.0.attention.0.layer_attention.lambda_t': torch.zeros(64, 1, 1)}
    with pytest.raises(UserError, match=r'official dynamic_la_light checkpoint.*kcla model'):
        convert_official(dla, 'cifar_resnet20_kcla')


def test_native_checkpoint_passes_through_unchanged():
    model = timm.create_model('cifar_resnet20_mrlab')
    sd = model.state_dict()
    assert checkpoint_filter_fn(sd, model).keys() == sd.keys()


def test_converted_layout_is_checked_not_reconverted():
    model = timm.create_model('cifar_resnet20_mrlal')
    out = convert_official(model.state_dict(), 'cifar_resnet20_mrlal')
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def test_cli_convert_training_checkpoint(tmp_path, capsys):
    official = official_cifar20('kcla')
    ckpt = {'epoch': 299, 'arch': 'kcla', 'best_acc': torch.tensor(77.5),
            'state_dict': {'module.' + k: v for k, v in official.items()},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}}
    src, out = tmp_path / 'checkpoint.pth.tar', tmp_path / 'kcla20.safetensors'
    torch.save(ckpt, src)
    assert cli_main(['convert', '--model', 'cifar_resnet20_kcla', str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert 'dropped 7 official parameter(s) that never run' in text and 'stages.0.0.kcla.u_Wk.weight' in text
    model = timm.create_model('cifar_resnet20_kcla', pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    expected = convert_official(official, 'cifar_resnet20_kcla')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    # refuses to overwrite, and a wrong model leaves no file behind
    assert cli_main(['convert', '--model', 'cifar_resnet20_kcla', str(src), str(out)]) == 2
    bad = tmp_path / 'bad.safetensors'
    assert cli_main(['convert', '--model', 'cifar_resnet20_mrlab', str(src), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith('timm-layerattn convert: error:') for line in err)
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth.tar', 'kcla20.safetensors']


# ---------------------------------------------------------------------------------------------------------------
# CNNtention key map (docs/design/cnntention.md#cnn-conversion)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['selfatt', 'mha', 'cbam'])
def test_cnntention_key_map(variant):
    official = {k: torch.tensor(float(i)) for i, k in enumerate(CNNTENTION_TRUNK)}
    for site in (1, 2, 3):
        for j, name in enumerate(CNNTENTION_KEYS[variant]):
            official[f'att{site}.{name}'] = torch.tensor(100. * site + j)
    out = remap_cnntention_keys(official, variant)
    expected = {k: k for k in CNNTENTION_TRUNK}
    expected.update({f'att{s}.{o}': f'layer{s}.attn.{n}' for s in (1, 2, 3)
                     for o, n in CNNTENTION_KEYS[variant].items()})
    assert sorted(out) == sorted(expected.values())
    for old, new in expected.items():
        assert out[new] is official[old]


@pytest.mark.parametrize('variant', ['selfatt', 'mha', 'cbam'])
def test_cnntention_checkpoint_converts(variant):
    name = f'cifar_resnet20_basic_{variant}'
    if not timm.is_model(name):
        pytest.skip(f'{name} is not registered yet (CNNtention models are added by the CNNtention work)')
    model = timm.create_model(name).eval()
    ours = model.state_dict()
    to_official = {f'layer{s}.attn.{n}': f'att{s}.{o}'
                   for s in (1, 2, 3) for o, n in CNNTENTION_KEYS[variant].items()}
    official = {to_official.get(k, k): torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.items()}
    converted = convert_official(official, name)
    model.load_state_dict(converted, strict=True)
    for k in ours:
        assert torch.equal(converted[k], official[to_official.get(k, k)])


# ---------------------------------------------------------------------------------------------------------------
# load_trunk
# ---------------------------------------------------------------------------------------------------------------

def test_load_trunk_from_timm_resnet50_state_dict():
    src = timm.create_model('resnet50').state_dict()
    model = timm.create_model('resnet50_kcla')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = load_trunk(model, src)
    after = model.state_dict()
    assert len(result.loaded) == len(src) and not result.skipped  # every timm resnet50 tensor fits the trunk
    for k in result.loaded:
        assert torch.equal(after[k], src[k])
    attn = [k for k in after if '.attn.' in k]
    assert sorted(result.missing) == sorted(attn)
    for k in result.missing:
        assert torch.equal(after[k], before[k])
    assert f'left {len(attn)} at init ({len(attn)} attention, 0 other)' in result.summary()


def test_load_trunk_from_file_reports_what_it_skipped(tmp_path):
    src = timm.create_model('cifar_resnet20_mrlal', num_classes=100).state_dict()
    path = tmp_path / 'mrlal100.safetensors'
    safetensors.torch.save_file(src, str(path))
    model = timm.create_model('cifar_resnet20_kcla')  # 10 classes
    result = load_trunk(model, path)
    attn_src = [k for k in src if '.attn.' in k]
    skipped_attn = {k for k, r in result.skipped.items() if r.startswith('attention')}
    assert skipped_attn == {k for k in attn_src if k in model.state_dict()}
    assert result.skipped['fc.weight'] == 'shape mismatch' and result.skipped['fc.bias'] == 'shape mismatch'
    assert all(result.skipped[k] == 'not in model' for k in attn_src if k not in model.state_dict())
    trunk = [k for k in src if '.attn.' not in k and not k.startswith('fc.')]
    assert sorted(result.loaded) == sorted(trunk)
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in trunk)
