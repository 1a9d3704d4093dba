"""The checkpoint package: the one unwrapping rule, the one reader, the one strict matcher and its hints, and
each family's checkpoint filter on tiny synthetic official-layout state dicts."""
import argparse
import ast
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest
import safetensors.torch
import torch

from timm_layerattn._utils.errors import UserError
from timm_layerattn.checkpoints import (
    CONVERTIBLE, attention_shortcuts, cnntention, gradattn, kcla_mrla, official_layout)
from timm_layerattn.checkpoints import deit_mrla
from timm_layerattn.checkpoints import match as match_mod
from timm_layerattn.checkpoints.errors import CheckpointError
from timm_layerattn.checkpoints.io import (
    check_finite, check_state_dict_values, non_finite_keys, read_raw, read_state_dict, strip_wrapper_prefixes,
    unwrap_checkpoint, unwrap_state_dict)
from timm_layerattn.checkpoints.match import (
    Layout, block_type, blocks_per_stage, check_state_dict, checkpoint_kind, fit_hints, layout_of, match_keys,
    mismatch_parts, suggest_arch)

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_layerattn' / 'checkpoints'


def _t(*shape: int, value: float = 1.) -> torch.Tensor:
    return torch.full(shape, value)


class _Model(torch.nn.Module):
    """Stands in for a model: the filters only ask for its state dict."""

    def __init__(self, keys: Dict[str, torch.Tensor]):
        super().__init__()
        self._keys = keys

    def state_dict(self, *args, **kwargs):
        return dict(self._keys)


# -----------------------------------------------------------------------------------------------------------
# Layering
# -----------------------------------------------------------------------------------------------------------

def test_package_imports_no_model_or_tool_code():
    """Not even inside functions: the package must stay below the models, tools and integrations."""
    banned = ('models', 'tools', 'train', 'hub', 'det', 'cli', 'convert')
    for path in PACKAGE.glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ''] if node.level == 0 else []
                if node.level == 2:  # from ..x import y
                    names = [f'timm_layerattn.{node.module}' if node.module else 'timm_layerattn']
                    names += [f'timm_layerattn.{a.name}' for a in node.names if not node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not any(name == f'timm_layerattn.{b}' or name.startswith(f'timm_layerattn.{b}.')
                               for b in banned), (path.name, name)


# -----------------------------------------------------------------------------------------------------------
# The unwrapping rule
# -----------------------------------------------------------------------------------------------------------

def test_prefixes_are_stripped_repeatedly():
    assert strip_wrapper_prefixes('module._orig_mod.module.layer1.0.conv1.weight') == 'layer1.0.conv1.weight'
    assert strip_wrapper_prefixes('_orig_mod.fc.weight') == 'fc.weight'
    assert strip_wrapper_prefixes('layer1.module.x') == 'layer1.module.x'  # only at the front
    assert strip_wrapper_prefixes(3) == 3


def test_nested_containers():
    sd = {'conv1.weight': _t(2)}
    found, container = unwrap_state_dict({'epoch': 3, 'model': {'state_dict': {'module.conv1.weight': _t(2)}}})
    assert container == 'model.state_dict' and found.keys() == sd.keys()
    found, container = unwrap_state_dict(sd)
    assert container == '' and found.keys() == sd.keys()


def test_ema_preference():
    plain, ema = {'w': _t(1, value=1.)}, {'w': _t(1, value=2.)}
    ckpt = {'state_dict': plain, 'state_dict_ema': ema, 'epoch': 4}
    found, container = unwrap_state_dict(ckpt)
    assert container == 'state_dict_ema' and found['w'].item() == 2.
    found, container = unwrap_state_dict(ckpt, prefer_ema=False)
    assert container == 'state_dict' and found['w'].item() == 1.
    # every EMA spelling, and the EMA weights as a fallback when there is nothing else
    for key in ('state_dict_ema', 'model_ema', 'ema'):
        assert unwrap_state_dict({'model': plain, key: ema})[1] == key
        assert unwrap_state_dict({key: ema}, prefer_ema=False)[1] == key
    # an empty container is skipped; a container wins next to stray tensors
    assert unwrap_state_dict({'state_dict_ema': {}, 'state_dict': plain})[1] == 'state_dict'
    assert unwrap_state_dict({'best_acc1': torch.tensor(77.), 'state_dict': plain})[1] == 'state_dict'


def test_unwrap_keeps_or_drops_non_tensors():
    ckpt = {'state_dict': {'module.w': _t(1), 'step': 7}}
    found, _ = unwrap_checkpoint(ckpt)
    assert found == {'w': ckpt['state_dict']['module.w'], 'step': 7}  # the filters report the int
    assert list(unwrap_state_dict(ckpt)[0]) == ['w']
    with pytest.raises(UserError, match=r'no tensors found in the checkpoint \(top-level keys: arch, lr\)'):
        unwrap_state_dict({'lr': 0.1, 'arch': 'x'})
    with pytest.raises(UserError, match='checkpoint holds a list'):
        unwrap_checkpoint([1, 2])


# -----------------------------------------------------------------------------------------------------------
# The reader
# -----------------------------------------------------------------------------------------------------------

def _reads(path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        read_state_dict(path, **kwargs)
    text = str(info.value)
    assert str(path) in text and '\n' not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def test_reader_errors_name_the_file(tmp_path):
    sd = {'conv1.weight': _t(2, 3)}
    _reads(tmp_path / 'missing.pth', 'checkpoint not found')
    _reads(tmp_path, 'not a file')
    (tmp_path / 'empty.pth').write_bytes(b'')
    _reads(tmp_path / 'empty.pth', 'file is empty')
    safetensors.torch.save_file(sd, str(tmp_path / 'good.safetensors'))
    raw = (tmp_path / 'good.safetensors').read_bytes()
    (tmp_path / 'truncated.safetensors').write_bytes(raw[:len(raw) // 2])
    _reads(tmp_path / 'truncated.safetensors', 'truncated or corrupt')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint\n' * 10)
    _reads(tmp_path / 'garbage.pth', 'not a torch checkpoint')
    torch.save(sd, tmp_path / 'good.pth')
    raw = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(raw[:len(raw) // 2])
    _reads(tmp_path / 'truncated.pth', 'truncated or corrupt')
    torch.save([1, 2], tmp_path / 'list.pth')
    _reads(tmp_path / 'list.pth', 'holds a list')
    torch.save({'epoch': 3}, tmp_path / 'no_tensors.pth')
    _reads(tmp_path / 'no_tensors.pth', 'no tensors found')


def test_reader_never_unpickles_objects(tmp_path):
    import fractions
    path = tmp_path / 'obj.pth'
    torch.save({'lr': fractions.Fraction(1, 10), 'state_dict': {'w': _t(1)}}, path)
    _reads(path, 'fractions.Fraction', 'only a full unpickle', 'weights_only=True')
    # timm's training checkpoints: its reader allows their `args`, and so does ours, always (TRAINING_GLOBALS)
    path = tmp_path / 'args.pth'
    torch.save({'args': argparse.Namespace(lr=0.1), 'state_dict': {'w': _t(1)}}, path)
    found, container = read_state_dict(path)
    assert container == 'state_dict' and list(found) == ['w']
    # the allowance does not outlive the call
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_reader_sniffs_safetensors_by_content(tmp_path):
    sd = {'module.conv1.weight': _t(2, 3)}
    path = tmp_path / 'weights.bin'
    path.write_bytes(safetensors.torch.save(sd))
    obj, fmt = read_raw(path)
    assert fmt == 'safetensors' and list(obj) == ['module.conv1.weight']
    assert list(read_state_dict(path)[0]) == ['conv1.weight']
    torch.save(sd, tmp_path / 'weights.pth')
    assert read_raw(tmp_path / 'weights.pth')[1] == 'torch'


def test_value_checks():
    sd = {'a': _t(3), 'b': torch.tensor([1., float('nan'), float('inf')]), 'c': torch.arange(3)}
    assert non_finite_keys(sd) == ['b']
    assert non_finite_keys({'big': torch.full((4,), 3e38)}) == []  # an overflowing sum is confirmed element-wise
    with pytest.raises(CheckpointError, match=r'w.pth: 1 tensor\(s\) hold NaN / Inf values.*b \(1 NaN, 1 Inf\)'):
        check_state_dict_values(sd, 'w.pth')
    with pytest.raises(CheckpointError, match=r'entry is not a tensor: epoch \(int\)'):
        check_state_dict_values({'a': _t(1), 'epoch': 3}, 'w.pth')
    with pytest.raises(CheckpointError, match='holds no tensors'):
        check_state_dict_values({'lr': 0.1}, 'w.pth')
    with pytest.raises(CheckpointError, match='holds a list'):
        check_state_dict_values([1], 'w.pth')
    with pytest.raises(UserError, match=r'the checkpoint holds non-finite values \(NaN or inf\) in 1 tensor\(s\): b'):
        check_finite(sd)


# -----------------------------------------------------------------------------------------------------------
# The matcher and its hints
# -----------------------------------------------------------------------------------------------------------

def test_match_lists_and_wording():
    expected = {f'k{i}': _t(2) for i in range(6)}
    sd = {'k0': _t(2), 'k1': _t(3), 'extra': _t(1)}
    found = match_keys(sd, expected)
    assert found.unexpected == ['extra'] and found.missing == ['k2', 'k3', 'k4', 'k5'] and found.mismatched == ['k1']
    assert found.shapes == {'k1': ((3,), (2,))} and not found.ok
    assert match_keys(expected, expected).ok
    parts = found.parts()
    assert parts == ['1 unexpected key(s): extra', '4 missing key(s): k2, k3, k4, ... (1 more)',
                     '1 shape mismatch(es): k1 checkpoint [3] vs model [2]']
    assert mismatch_parts(sd, expected, kinds=('shape',)) == parts[2:]
    assert mismatch_parts(sd, expected, source_names={'extra': 'official.extra', 'k1': 'k1'})[0] == \
        '1 unexpected key(s): official.extra (-> extra)'
    with pytest.raises(UserError, match=r"^checkpoint does not fit 'x': 1 unexpected key\(s\)"):
        check_state_dict(sd, expected, what="'x'")
    check_state_dict(expected, {k: torch.empty(2, device='meta') for k in expected})  # meta shapes are enough


def _cfg(layers, kind='plain', stem='cifar', block='bottleneck', head_dim=16):
    attn = None if kind == 'plain' else SimpleNamespace(type=kind, head_dim=head_dim)
    return SimpleNamespace(layers=layers, stem_type=stem, block=block, attn=attn)


_CANDIDATES = {
    'net20': _cfg((2, 2, 2)), 'net20_basic': _cfg((2, 2, 2), block='basic'),
    'net20_kcla': _cfg((2, 2, 2), 'kcla'), 'net56_kcla': _cfg((6, 6, 6), 'kcla'),
    'net20_mrlal': _cfg((2, 2, 2), 'mrla_light'),
    'imagenet_kcla': _cfg((2, 2, 2), 'kcla', stem=''),
    'as_net': SimpleNamespace(layers=(2, 2, 2), stem_type='cifar', block='bottleneck', strategy=object()),
}


def _native(layers, kind='plain', block='bottleneck', heads=4, channels=64) -> Dict[str, torch.Tensor]:
    """A state dict in this package's layout with `layers` blocks per stage."""
    sd = {'conv1.weight': _t(16, 3, 3, 3)}
    for s, n in enumerate(layers, start=1):
        for i in range(n):
            p = f'layer{s}.{i}.'
            sd.update({p + 'conv1.weight': _t(1), p + 'conv2.weight': _t(1)})
            if block == 'bottleneck':
                sd[p + 'conv3.weight'] = _t(1)
            if kind == 'kcla':
                sd.update({p + 'attn.norm_d': _t(heads), p + 'attn.v.weight': _t(channels, channels)})
            elif kind == 'mrla_light':
                sd.update({p + 'attn.lambda_t': _t(1), p + 'attn.v.weight': _t(channels, channels)})
    sd.update({'fc.weight': _t(10, 64), 'fc.bias': _t(10)})
    return sd


def test_layout_kinds_and_depths():
    assert checkpoint_kind(_native((2, 2, 2), 'kcla')) == 'kcla'
    assert checkpoint_kind(_native((2, 2, 2), 'mrla_light')) == 'mrla_light'
    assert checkpoint_kind(['layer1.0.attn.v.weight']) == 'mrla_base'
    assert checkpoint_kind(['layer1.attn.channel_mlp.fc1.weight']) == 'CNNtention cbam'
    assert checkpoint_kind(['layer1.attn.proj.weight', 'layer1.attn.gamma']) == 'CNNtention mha'
    assert checkpoint_kind(['layer1.attn.gamma']) == 'CNNtention selfatt'
    assert checkpoint_kind(['as_proj.w64.k.weight']) == checkpoint_kind(['layer2.attn_in.q.weight']) == \
        'attention-shortcut'
    assert checkpoint_kind(['neck.proj.0.weight']) == 'gradattn'
    assert checkpoint_kind(_native((2, 2, 2))) == 'plain'
    assert blocks_per_stage(_native((3, 4, 6, 3))) == (3, 4, 6, 3) and blocks_per_stage(['fc.weight']) == ()
    assert block_type(_native((1, 1, 1))) == 'bottleneck' and block_type(_native((1, 1, 1), block='basic')) == 'basic'
    assert block_type(['fc.weight']) is None


def test_layout_of():
    sd = {'conv1.weight': _t(1)}
    for s, (n, width) in enumerate(((2, 64), (2, 128)), start=1):
        for i in range(n):
            sd.update({f'layer{s}.{i}.conv1.weight': _t(1), f'layer{s}.{i}.conv3.weight': _t(width, 1)})
        sd[f'layer{s}.0.downsample.0.weight'] = _t(width, 1)
    assert layout_of(sd) == Layout('plain', (2, 2), 'bottleneck', (64, 128), True)
    assert layout_of({k: v for k, v in sd.items() if 'downsample' not in k}).projections is False
    assert layout_of({'fc.weight': _t(1)}) == Layout('plain', ())


def test_suggest_arch():
    def suggest(kind, layers, stem='cifar', block=None, **kwargs):
        return suggest_arch(Layout(kind, layers, block, **kwargs), stem, candidates=_CANDIDATES)

    assert suggest('kcla', (6, 6, 6)) == 'net56_kcla'
    assert suggest('kcla', (2, 2, 2), stem='') == 'imagenet_kcla'
    assert suggest('plain', (2, 2, 2)) == 'net20'
    assert suggest('plain', (2, 2, 2), block='basic') == 'net20_basic'
    assert suggest('kcla', (3, 3, 3)) is None
    assert suggest('attention-shortcut', (2, 2, 2)) is None  # other strategies are told by their keys only
    # widths and shortcut projections, where the config tells them
    cands = {'half': SimpleNamespace(layers=(2, 2), stem_type='', block='bottleneck', channels=(64, 128),
                                     out_channels=(128, 256), residual='proj'),
             'no_shortcuts': SimpleNamespace(layers=(2, 2), stem_type='', block='bottleneck', channels=(64, 128),
                                             residual='none'),
             'net': SimpleNamespace(layers=(2, 2), stem_type='', block='bottleneck', channels=(64, 128),
                                    residual='proj')}
    assert suggest_arch(Layout('plain', (2, 2), 'bottleneck', (256, 512), True), '', cands) == 'net'
    assert suggest_arch(Layout('plain', (2, 2), 'bottleneck', (128, 256), True), '', cands) == 'half'
    assert suggest_arch(Layout('plain', (2, 2), 'bottleneck', (256, 512), False), '', cands) == 'no_shortcuts'
    assert suggest_arch(Layout('plain', (2, 2), 'bottleneck', (32, 64), True), '', cands) is None


def test_suggest_arch_reads_the_family_registry(monkeypatch):
    fams = [SimpleNamespace(models={'a_kcla': _cfg((2, 2, 2), 'kcla')}),
            SimpleNamespace(models={'b_net': _cfg((2, 2, 2))})]
    monkeypatch.setattr(match_mod, 'families', lambda: fams)
    assert suggest_arch(Layout('plain', (2, 2, 2)), 'cifar') == 'b_net'
    assert suggest_arch(Layout('kcla', (2, 2, 2)), 'cifar') == 'a_kcla'
    # the skeleton's configs: the attention is the strategy's
    fams.append(SimpleNamespace(models={'c_mrlal': SimpleNamespace(
        layers=(4, 4, 4), stem_type='cifar', block='bottleneck',
        strategy=SimpleNamespace(attn=SimpleNamespace(type='mrla_light', head_dim=16)))}))
    assert suggest_arch(Layout('mrla_light', (4, 4, 4)), 'cifar') == 'c_mrlal'
    monkeypatch.setattr(match_mod, 'families', lambda: [])
    assert suggest_arch(Layout('plain', (2, 2, 2)), 'cifar') is None  # nothing registered: no suggestion


def test_fit_hints():
    def hints(sd, model_sd, cfg, arch='net20_kcla', **kwargs):
        return fit_hints(sd, model_sd, arch=arch, model_cfg=cfg, candidates=_CANDIDATES, **kwargs)

    kcla = _native((2, 2, 2), 'kcla')
    # another family, same depth
    got = hints(_native((2, 2, 2), 'mrla_light'), kcla, _CANDIDATES['net20_kcla'])
    assert got == ["the checkpoint holds mrla_light weights, 'net20_kcla' is kcla; create 'net20_mrlal' instead"]
    # same family, another depth
    got = hints(_native((6, 6, 6), 'kcla'), kcla, _CANDIDATES['net20_kcla'])
    assert got == ["the checkpoint holds kcla weights with 6-6-6 blocks per stage, 'net20_kcla' is kcla with 2-2-2; "
                   "create 'net56_kcla' instead"]
    # plain weights: the architecture to create, and the warm start
    got = hints(_native((2, 2, 2)), kcla, _CANDIDATES['net20_kcla'])
    assert len(got) == 1 and "holds plain weights" in got[0] and "create 'net20' instead" in got[0]
    assert 'timm_layerattn.load_trunk(model, path)' in got[0]
    # KCLA head dim: 64 channels in 8 heads is head dim 8, the model's is 16
    got = hints(_native((2, 2, 2), 'kcla', heads=8), kcla, _CANDIDATES['net20_kcla'])
    assert got == ["the checkpoint's KCLA head dim is 8, the model's 16: pass head_dim=8 to timm.create_model"]
    # classifier size
    c100 = dict(kcla, **{'fc.weight': _t(100, 64), 'fc.bias': _t(100)})
    got = hints(c100, kcla, _CANDIDATES['net20_kcla'], declared_classes=10)
    assert got == ["the checkpoint's classifier has 100 classes, the model 10 (the pretrained cfg says 10): declare "
                   "the checkpoint's with pretrained_cfg_overlay=dict(..., num_classes=100) and pass num_classes=10 "
                   "for a new 10-class head"]
    assert hints(kcla, kcla, _CANDIDATES['net20_kcla']) == []
    # a classifier of the same classes on other features is no classifier-size problem
    wider = dict(kcla, **{'fc.weight': _t(10, 128)})
    assert hints(wider, kcla, _CANDIDATES['net20_kcla']) == []
    # no suggestion without a stem to match, or for the architecture itself
    got = hints(_native((2, 2, 2), 'mrla_light'), kcla, None)
    assert got == ["the checkpoint holds mrla_light weights, 'net20_kcla' is kcla"]


# -----------------------------------------------------------------------------------------------------------
# The families' rules
# -----------------------------------------------------------------------------------------------------------

def test_kcla_mrla_rules():
    official = {
        'conv1.weight': _t(1),
        'layer1.layers.0.conv1.weight': _t(1),
        'layer1.attention.0.Wq.weight': _t(1),
        'layer1.attention.0.head_att.weight': _t(1),
        'layer1.attention.0.norm_d': _t(1, 4, 1, 1, 1),
        'layer1.attention.0.Wv.weight': _t(64, 1),
        'layer1.attention.0.bn_attention.running_mean': _t(1),
        'layer1.attention.0.adjust_channel.weight': _t(1),  # never runs: the model has no such module
        'layer2.attention.0.adjust_channel.weight': _t(1),  # runs: kept
        'fc.weight': _t(1),
    }
    assert kcla_mrla.is_official(official) and kcla_mrla.official_type(official) == 'kcla'
    assert kcla_mrla.infer_head_dim(official) == 16
    model = _Model({k: _t(1) for k in (
        'conv1.weight', 'layer1.0.conv1.weight', 'layer1.0.attn.q.weight', 'layer1.0.attn.head_gate.weight',
        'layer1.0.attn.norm_d', 'layer1.0.attn.v.weight', 'layer1.0.attn.norm.running_mean',
        'layer2.0.attn.hist_proj.weight', 'fc.weight')})
    wrapped = {'epoch': 9, 'state_dict': {'module.' + k: v for k, v in official.items()}}
    out = kcla_mrla.filter_checkpoint(wrapped, model)
    assert set(out) == set(model.state_dict())
    assert out['layer1.0.attn.norm_d'].shape == (4,)
    assert out['layer1.0.attn.v.weight'] is official['layer1.attention.0.Wv.weight']

    mrla = {'stages.0.0.conv1.weight': _t(1), 'stages.0.0.mrla.mrla.Wq.weight': _t(1),
            'stages.0.0.bn_mrla.weight': _t(1), 'layer1.0.mrla.lambda_t': _t(1)}
    assert kcla_mrla.remap_keys(mrla) == {
        'layer1.0.conv1.weight': mrla['stages.0.0.conv1.weight'], 'layer1.0.attn.q.weight': mrla[
            'stages.0.0.mrla.mrla.Wq.weight'], 'layer1.0.attn.norm.weight': mrla['stages.0.0.bn_mrla.weight'],
        'layer1.0.attn.lambda_t': mrla['layer1.0.mrla.lambda_t']}
    assert kcla_mrla.official_type(mrla) == 'mrla_light'
    assert kcla_mrla.official_type({'stages.0.0.mrla.mrla.Wq.weight': _t(1)}) == 'mrla_base'
    # a trunk of the official code needs renaming but is no attention checkpoint
    trunk = {'stages.0.0.conv1.weight': _t(1)}
    assert kcla_mrla.is_official(trunk) and kcla_mrla.official_type(trunk) is None

    native = _native((2, 2, 2), 'kcla')
    assert not kcla_mrla.is_official(native) and kcla_mrla.official_type(native) is None
    out = kcla_mrla.filter_checkpoint(native, _Model(native))
    assert out == native and out is not native


def test_cnntention_rules():
    official = {'conv1.weight': _t(1), 'att1.weights': torch.tensor(0.5), 'att1.key.weight': _t(1, value=1.),
                'att1.query.weight': _t(1, value=2.), 'att1.val.weight': _t(1), 'att1.linear.weight': _t(1)}
    assert cnntention.is_official(official) and cnntention.official_type(official) == 'cnntention'
    assert cnntention.official_variant(official) == 'mha'
    out = cnntention.filter_checkpoint({'model': {'module.' + k: v for k, v in official.items()}}, _Model({}))
    assert set(out) == {'conv1.weight', 'layer1.attn.gamma', 'layer1.attn.q.weight', 'layer1.attn.k.weight',
                        'layer1.attn.v.weight', 'layer1.attn.proj.weight'}
    assert out['layer1.attn.gamma'].shape == (1,)
    assert out['layer1.attn.q.weight'].item() == 1. and out['layer1.attn.k.weight'].item() == 2.  # swapped
    cbam = {'att2.channel_attention.mlp.0.weight': _t(1), 'att2.spatial_attention.conv.weight': _t(1)}
    assert cnntention.official_variant(cbam) == 'cbam'
    assert set(cnntention.remap_keys(cbam, 'cbam')) == {'layer2.attn.channel_mlp.fc1.weight',
                                                         'layer2.attn.spatial_conv.weight'}
    assert cnntention.official_variant({'att3.query.weight': _t(1)}) == 'selfatt'
    with pytest.raises(ValueError, match='unknown CNNtention variant'):
        cnntention.remap_keys(cbam, 'nope')
    native = {'conv1.weight': _t(1), 'layer1.attn.gamma': _t(1)}
    assert not cnntention.is_official(native) and cnntention.filter_checkpoint(native, _Model({})) == native


def test_gradattn_rules():
    q, k, v = _t(2, 4, value=1.), _t(2, 4, value=2.), _t(2, 4, value=3.)
    official = {
        'conv1.weight': _t(1), 'projections.0.2.weight': _t(1), 'positional_embedding': _t(1),
        'transformer_layers.0.self_attn.w_q.weight': q, 'transformer_layers.0.self_attn.w_k.weight': k,
        'transformer_layers.0.self_attn.w_v.weight': v, 'transformer_layers.0.self_attn.w_o.weight': _t(1),
        'transformer_layers.0.self_attn.rotary_emb.inv_freq': _t(1),
        'transformer_encoder.layers.1.self_attn.in_proj_weight': _t(1),
        'transformer_encoder.layers.1.linear1.weight': _t(1), 'classifier.weight': _t(1),
    }
    assert gradattn.is_official(official) and gradattn.official_type(official) == 'gradattn'
    out = gradattn.filter_checkpoint({'state_dict': official}, _Model({}))
    assert set(out) == {'conv1.weight', 'neck.proj.0.weight', 'neck.pos_embed', 'neck.layers.0.qkv.weight',
                        'neck.layers.0.proj.weight', 'neck.layers.1.qkv.weight', 'neck.layers.1.fc1.weight',
                        'fc.weight'}
    assert torch.equal(out['neck.layers.0.qkv.weight'], torch.cat([q, k, v]))
    native = {'neck.proj.0.weight': _t(1), 'fc.weight': _t(1)}
    assert not gradattn.is_official(native) and gradattn.filter_checkpoint(native, _Model({})) == native


def test_attention_shortcut_rules():
    model = _Model({'conv1.weight': _t(1), 'layer2.attn_in.q.weight': _t(2), 'layer2.attn_in.norm.weight': _t(3)})
    plain = {'module.conv1.weight': _t(1, value=5.)}
    assert attention_shortcuts.is_plain_trunk(plain) and not attention_shortcuts.is_official(plain)
    assert attention_shortcuts.official_type(plain) is None
    out = attention_shortcuts.filter_checkpoint(plain, model)
    assert set(out) == set(model.state_dict()) and out['conv1.weight'].item() == 5.
    assert set(plain) == {'module.conv1.weight'}  # the caller's dict is left alone
    own = {'conv1.weight': _t(1), 'layer2.attn_in.q.weight': _t(2)}  # a checkpoint of the family: unchanged
    assert attention_shortcuts.filter_checkpoint(own, model) == own


def test_official_layout_loop():
    assert CONVERTIBLE[:2] == (kcla_mrla, cnntention)  # in registration order; the families of issue 22 follow
    assert deit_mrla in CONVERTIBLE
    assert official_layout({'blocks.0.mrla.lambda_t': _t(1)}) == 'deit_mrla_light'  # not the ResNet MRLA-L layout
    assert official_layout({'layer1.attention.0.head_att.weight': _t(1)}) == 'kcla'
    assert official_layout({'att1.query.weight': _t(1)}) == 'cnntention'
    assert official_layout({'projections.0.2.weight': _t(1)}) is None  # GradAttn: only the model's filter
    assert official_layout(_native((1, 1, 1))) is None
