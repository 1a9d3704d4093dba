"""Catalogue of bad inputs on the model side: every case gets a clean error naming the problem, or the right result.

Constructor arguments and configs fail where they are given: a value of the wrong type is a `TypeError`, a
value out of range (NaN included) a `ValueError`, and the message names the model or config, the argument,
the allowed values and the value given. Forward rejects inputs that cannot be images of the model with a
one-line `AssertionError` (`torch._assert`, which stays traceable and scriptable). Empty batches are valid
everywhere and give empty outputs. Sibling files hold the checkpoint and CLI cases.
"""
import pytest
import timm
import torch

import timm_layerattn
from timm_layerattn.layers import KCLA, LayerAttnCfg, MRLABase, MRLALight, native
from timm_layerattn.layers.shortcut import AttentionShortcut, ShortcutCfg
from timm_layerattn.models.cnntention import CBAM, MultiHeadAttention2d
from timm_layerattn.models.gradattn import GradAttnNeck, TokenEncoderLayer
from timm_layerattn.models.resnet_trunk import ResNetLA, ResNetLACfg

NAN = float('nan')
ALL_MODELS = timm_layerattn.models.list_models()
# One model per code path of the forward (layer attention, shortcuts, stage attention, token neck, plain).
PATHS = [
    'cifar_resnet20', 'cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab', 'cifar_resnet50_as_out',
    'cifar_resnet50_as_kv', 'cifar_resnet50_as_stages', 'cifar_resnet20_basic_selfatt', 'cifar_resnet20_basic_mha',
    'cifar_resnet20_basic_cbam', 'resnet18_gradattn_rope', 'resnet50_kcla',
]
_RATE = 'a probability in [0, 1)'

# (model, kwargs, error type, message fragment)
CONSTRUCTOR_CASES = [
    # timm's arguments, every family
    ('cifar_resnet20_kcla', dict(num_classes=-1), ValueError, 'num_classes must be a non-negative integer'),
    ('cifar_resnet20', dict(num_classes=1.5), TypeError, 'cifar_resnet20: num_classes must be'),
    ('cifar_resnet20', dict(num_classes='10'), TypeError, "got '10'"),
    ('cifar_resnet20', dict(num_classes=True), TypeError, 'got True'),
    ('cifar_resnet20_kcla', dict(in_chans=0), ValueError, 'in_chans must be a positive integer, got 0'),
    ('resnet18_gradattn_rope', dict(in_chans=-3), ValueError, 'in_chans must be a positive integer, got -3'),
    ('cifar_resnet20', dict(in_chans=2.0), TypeError, 'in_chans must be a positive integer, got 2.0'),
    ('cifar_resnet20', dict(in_chans=NAN), TypeError, 'in_chans must be a positive integer, got nan'),
    ('cifar_resnet20', dict(global_pool='nope'), ValueError, "global_pool must be one of ('', 'avg'"),
    ('cifar_resnet20', dict(global_pool=3), ValueError, 'global_pool must be one of'),
    ('cifar_resnet20', dict(output_stride=4), ValueError, 'output_stride must be one of 8, 16, 32, got 4'),
    ('cifar_resnet20', dict(output_stride=16.0), TypeError, 'output_stride must be one of 8, 16, 32, got 16.0'),
    ('cifar_resnet20_kcla', dict(drop_rate=-0.1), ValueError, f'drop_rate must be {_RATE}, got -0.1'),
    ('cifar_resnet20_kcla', dict(drop_rate=1.0), ValueError, f'drop_rate must be {_RATE}, got 1.0'),
    ('cifar_resnet20_kcla', dict(drop_rate=NAN), ValueError, f'drop_rate must be {_RATE}, got nan'),
    ('cifar_resnet20_kcla', dict(drop_rate='0.1'), TypeError, 'drop_rate must be'),
    ('resnet50_kcla', dict(drop_path_rate=1.5), ValueError, f'resnet50_kcla: drop_path_rate must be {_RATE}, got 1.5'),
    ('cifar_resnet20_mrlal', dict(drop_path_rate=-0.1), ValueError, f'drop_path_rate must be {_RATE}, got -0.1'),
    ('cifar_resnet20', dict(drop_path_rate=NAN), ValueError, 'drop_path_rate must be'),
    ('cifar_resnet50_plain', dict(drop_path_rate=0.1), ValueError, 'no residual branch to drop'),
    # layer attention: head_dim
    ('resnet50_kcla', dict(head_dim=0), ValueError,
     'resnet50_kcla: head_dim must be one of 2, 4, 8, 16, 32, 64, 128, 256 (channels per head'),
    ('resnet50_kcla', dict(head_dim=-4), ValueError, 'got -4'),
    ('cifar_resnet20_kcla', dict(head_dim=3), ValueError, 'must be divisible into heads'),
    ('cifar_resnet20_kcla', dict(head_dim=1), ValueError, "KCLA projects each stage's incoming history"),
    ('cifar_resnet20_mrlab', dict(head_dim=48), ValueError, 'head_dim must be one of 1, 2, 4, 8, 16, 32, 64'),
    ('cifar_resnet20_mrlal', dict(head_dim=16.0), TypeError, 'got 16.0'),
    ('cifar_resnet20_mrlal', dict(head_dim=NAN), TypeError, 'got nan'),
    ('cifar_resnet20', dict(head_dim=16), ValueError, 'head_dim is only valid for models with layer attention'),
    # attention shortcuts
    ('cifar_resnet50_as_out', dict(as_dim=0), ValueError, 'as_dim must be a positive multiple of as_heads (4), got 0'),
    ('cifar_resnet50_as_out', dict(as_dim=130), ValueError, 'got 130'),
    ('cifar_resnet50_as_out', dict(as_dim=128.0), TypeError, 'got 128.0'),
    ('cifar_resnet50_as_out', dict(as_heads=0), ValueError, 'as_heads must be a positive integer, got 0'),
    ('cifar_resnet50_as_out', dict(as_heads=4.0), TypeError, 'as_heads must be a positive integer, got 4.0'),
    ('cifar_resnet50_as_out', dict(as_heads=3), ValueError, 'must be one of 1, 2, 4, 8, 16, 32, 64, 128'),
    ('cifar_resnet50_as_kv', dict(as_heads=5), ValueError, 'every attention-shortcut site width 64, 128, 256'),
    ('cifar_resnet50_as_stages', dict(as_heads=7), ValueError, 'got 7'),
    ('cifar_resnet50_as_out', dict(q_proj='nope'), ValueError, "q_proj must be one of ('per_site', 'shared')"),
    ('cifar_resnet50_as_kv', dict(kv_adapter='nope'), ValueError, "kv_adapter must be one of ('separate', 'shared')"),
    ('cifar_resnet50_as_out', dict(act_after_ln='yes'), TypeError, "act_after_ln must be True or False, got 'yes'"),
    ('cifar_resnet50_as_stages', dict(pre_ln=0), TypeError, 'pre_ln must be True or False, got 0'),
    ('cifar_resnet50_as_out', dict(kv_adapter='shared'), TypeError, "does not take 'kv_adapter'"),
    # CNNtention
    ('cifar_resnet20_basic_mha', dict(att_heads=0), ValueError, 'att_heads must be one of 1, 2, 4, 8, 16'),
    ('cifar_resnet20_basic_mha', dict(att_heads=-8), ValueError, 'got -8'),
    ('cifar_resnet20_basic_mha', dict(att_heads=3), ValueError, 'every stage width 16, 32, 64'),
    ('cifar_resnet20_basic_mha', dict(att_heads=8.0), TypeError, 'got 8.0'),
    ('cifar_resnet20_basic_cbam', dict(cbam_reduction=0), ValueError, 'cbam_reduction must be a positive integer'),
    ('cifar_resnet20_basic_cbam', dict(cbam_reduction=-16), ValueError, 'got -16'),
    ('cifar_resnet20_basic_cbam', dict(cbam_reduction=2.5), TypeError, 'got 2.5'),
    ('cifar_resnet20_basic_cbam', dict(cbam_kernel=4), ValueError, 'cbam_kernel must be a positive odd integer, got 4'),
    ('cifar_resnet20_basic_cbam', dict(cbam_kernel=0), ValueError, 'got 0'),
    ('cifar_resnet20_basic_cbam', dict(cbam_kernel=-7), ValueError, 'got -7'),
    ('cifar_resnet20_basic_selfatt', dict(att_heads=8), TypeError, "does not take 'att_heads'"),
    # GradAttn's token encoder
    ('resnet18_gradattn_nope', dict(embed_dim=0), ValueError, 'embed_dim must be a positive multiple of num_heads (8)'),
    ('resnet18_gradattn_nope', dict(embed_dim=100), ValueError, 'got 100'),
    ('resnet18_gradattn_rope', dict(embed_dim=264), ValueError, 'multiple of 2 * num_heads (16), got 264'),
    ('resnet18_gradattn_nope', dict(embed_dim=256.0), TypeError, 'got 256.0'),
    ('resnet18_gradattn_lpe', dict(num_heads=0), ValueError, 'num_heads must be a positive integer, got 0'),
    ('resnet18_gradattn_lpe', dict(num_heads=-8), ValueError, 'got -8'),
    ('resnet18_gradattn_lpe', dict(num_heads=3), ValueError, 'embed_dim must be a positive multiple of num_heads (3)'),
    ('resnet18_gradattn_nope', dict(mlp_dim=0), ValueError, 'mlp_dim must be a positive integer, got 0'),
    ('resnet18_gradattn_nope', dict(depth=-3), ValueError, 'depth must be a non-negative integer'),
    ('resnet18_gradattn_nope', dict(depth=2.5), TypeError, 'got 2.5'),
    ('resnet18_gradattn_nope', dict(encoder_drop_rate=1.5), ValueError, f'encoder_drop_rate must be {_RATE}'),
    ('resnet18_gradattn_nope', dict(encoder_drop_rate=-0.1), ValueError, 'got -0.1'),
    ('resnet18_gradattn_nope', dict(encoder_drop_rate=NAN), ValueError, 'got nan'),
    # timm's own feature-index checks
    ('cifar_resnet20_kcla', dict(features_only=True, out_indices=(9,)), AssertionError, 'feature index 9 is out of range'),
    # the value given, not a normalised one (-10, not -6)
    ('cifar_resnet20_kcla', dict(features_only=True, out_indices=(-10,)), AssertionError,
     'feature index -10 is out of range (-4 to 3)'),
    # a classifier needs pooled features: refused at construction, not inside torch at forward
    ('cifar_resnet20_kcla', dict(global_pool=''), ValueError, "global_pool='' (no pooling) needs num_classes=0"),
    ('resnet18_gradattn_nope', dict(global_pool='', num_classes=5), ValueError, 'got num_classes=5'),
]


@pytest.mark.parametrize('name,kwargs,exc,fragment', CONSTRUCTOR_CASES,
                         ids=[f'{n}-{",".join(f"{k}={v!r}" for k, v in kw.items())}' for n, kw, _, _ in CONSTRUCTOR_CASES])
def test_bad_constructor_argument(name, kwargs, exc, fragment):
    with pytest.raises(exc) as info:
        timm.create_model(name, device='meta', **kwargs)
    assert fragment in str(info.value)
    assert '\n' not in str(info.value)


_CFG = dict(layers=(1, 1, 1), channels=(16, 32, 64))
# (builder, error type, message fragment): configs and modules built directly, without the registry.
CONFIG_CASES = [
    (lambda: LayerAttnCfg('kcla', head_dim=0), ValueError, 'LayerAttnCfg: head_dim must be a positive integer, got 0'),
    (lambda: LayerAttnCfg('kcla', head_dim=16.0), TypeError, 'LayerAttnCfg: head_dim'),
    (lambda: LayerAttnCfg('nope', head_dim=16), ValueError, "LayerAttnCfg: type must be one of ('kcla'"),
    (lambda: LayerAttnCfg('kcla', head_dim=16, drop_path=1.5), ValueError, 'drop_path must be a probability'),
    (lambda: LayerAttnCfg('kcla', head_dim=16, rebuild_blocks=(-1,)), ValueError, 'rebuild_blocks must be'),
    (lambda: LayerAttnCfg('kcla', head_dim=16, rebuild_blocks=0), TypeError, 'rebuild_blocks must be a tuple'),
    (lambda: ShortcutCfg(num_heads=0), ValueError, 'ShortcutCfg: num_heads must be a positive integer, got 0'),
    (lambda: ShortcutCfg(num_heads=NAN), TypeError, 'ShortcutCfg: num_heads'),
    (lambda: ShortcutCfg(norm_eps=0.), ValueError, 'ShortcutCfg: norm_eps must be a number > 0, got 0.0'),
    (lambda: ShortcutCfg(pre_norm='yes'), TypeError, 'ShortcutCfg: pre_norm must be True or False'),
    (lambda: ShortcutCfg(downsample='pool'), ValueError, "ShortcutCfg: downsample must be one of ('subsample', 'conv')"),
    (lambda: ResNetLACfg(layers=()), ValueError, 'ResNetLACfg: layers must be a non-empty tuple of stage depths'),
    (lambda: ResNetLACfg(layers=(1, 1)), ValueError, 'channels must be a tuple of 2 widths'),
    (lambda: ResNetLACfg(**_CFG, strides=(1, 2)), ValueError, 'strides must be a tuple of 3 strides'),
    (lambda: ResNetLACfg(**_CFG, strides=(1, 0, 2)), ValueError, 'strides must be a tuple of positive strides'),
    (lambda: ResNetLACfg(**_CFG, act_layer=3), TypeError, 'act_layer must be a timm layer name or a module class'),
    (lambda: ResNetLACfg(layers=(1, 0, 1)), ValueError, 'ResNetLACfg: layers must be a tuple of positive'),
    (lambda: ResNetLACfg(layers=(1, 1, 1), channels=(16, 32)), ValueError, 'channels must be a tuple of 3 widths'),
    (lambda: ResNetLACfg(layers=(1, 1, 1), channels=(16, -32, 64)), ValueError, 'channels must be a tuple of positive widths'),
    (lambda: ResNetLACfg(**_CFG, block='wide'), ValueError, "block must be one of ('bottleneck', 'basic')"),
    (lambda: ResNetLACfg(**_CFG, stem_type='tiered'), ValueError, "stem_type must be one of ('', 'deep', 'cifar', 'conv7_s1')"),
    (lambda: ResNetLACfg(**_CFG, stem_width=0), ValueError, 'stem_width must be a positive integer, got 0'),
    (lambda: ResNetLACfg(**_CFG, residual='sum'), ValueError, 'residual must be one of'),
    (lambda: ResNetLACfg(**_CFG, expansion=0), ValueError, 'expansion must be a positive integer'),
    (lambda: ResNetLACfg(**_CFG, zero_init_last='no'), TypeError, 'zero_init_last must be True or False'),
    (lambda: ResNetLACfg(**_CFG, strategy='kcla'), TypeError, 'strategy must be a LayerStrategy or None'),
    (lambda: ResNetLA({'layers': (1, 1, 1)}), TypeError, 'ResNetLA: cfg must be a ResNetLACfg'),
    (lambda: KCLA(64, head_dim=0), ValueError, 'KCLA: head_dim must be a positive integer, got 0'),
    (lambda: KCLA(64, head_dim=3), ValueError, 'KCLA: channels (64) must be divisible by head_dim (3)'),
    (lambda: KCLA(64, head_dim=16, history_stride=0), ValueError, 'KCLA: history_stride must be a positive integer'),
    (lambda: KCLA(64, head_dim=1, in_channels=32, rebuild=True), ValueError, 'incoming history width (32)'),
    (lambda: MRLALight(64, head_dim=-4), ValueError, 'MRLALight: head_dim must be a positive integer, got -4'),
    (lambda: MRLABase(0), ValueError, 'MRLABase: channels must be a positive integer, got 0'),
    (lambda: MRLABase(64, drop_path=-0.1), ValueError, 'MRLABase: drop_path must be a probability in [0, 1)'),
    (lambda: AttentionShortcut(64, num_heads=0), ValueError, 'AttentionShortcut: num_heads must be a positive integer'),
    (lambda: AttentionShortcut(64, num_heads=3), ValueError, 'not divisible by num_heads=3'),
    (lambda: AttentionShortcut(64, cache_dim=32, cache_stride=0), ValueError, 'cache_stride must be a positive'),
    (lambda: AttentionShortcut(64, cache_dim=32, downsample='subsample'), ValueError, "use downsample='conv'"),
    (lambda: MultiHeadAttention2d(16, num_heads=0), ValueError, 'MultiHeadAttention2d: num_heads must be a positive'),
    (lambda: CBAM(16, reduction=0), ValueError, 'CBAM: reduction must be a positive integer, got 0'),
    (lambda: CBAM(16, kernel_size=6), ValueError, 'CBAM: kernel_size must be a positive odd integer, got 6'),
    (lambda: TokenEncoderLayer(256, num_heads=0), ValueError, 'TokenEncoderLayer: num_heads must be a positive'),
    (lambda: TokenEncoderLayer(250, num_heads=8), ValueError, 'TokenEncoderLayer: dim must be a positive multiple'),
    (lambda: GradAttnNeck([64, 128], pos='sin'), ValueError, "GradAttnNeck: pos must be one of ('none', 'learned'"),
    (lambda: GradAttnNeck([64, 128], depth=-1), ValueError, 'GradAttnNeck: depth must be a non-negative integer'),
]


@pytest.mark.parametrize('build,exc,fragment', CONFIG_CASES, ids=[c[2][:40] for c in CONFIG_CASES])
def test_bad_config_or_module_argument(build, exc, fragment):
    with pytest.raises(exc) as info:
        build()
    assert fragment in str(info.value)


def test_bad_reset_classifier():
    model = timm.create_model('cifar_resnet20_kcla', device='meta')
    with pytest.raises(ValueError, match='cifar_resnet20_kcla: num_classes must be a non-negative integer'):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match='global_pool must be one of'):
        model.reset_classifier(10, 'mean')
    assert model.num_classes == 10 and model.fc.out_features == 10  # a refused reset changes nothing
    with pytest.raises(ValueError, match="global_pool='' \\(no pooling\\) needs num_classes=0"):
        model.reset_classifier(10, '')
    model.reset_classifier(0, '')  # unpooled maps without a classifier: timm's features_only / pruning path
    assert model.num_classes == 0 and model.global_pool.pool_type == ''
    model.reset_classifier(3)  # a new classifier without a pool given gets the default pooling back (timm's tests)
    assert model.num_classes == 3 and model.global_pool.pool_type == 'avg'
    with pytest.raises(ValueError, match="needs num_classes=0"):
        timm.create_model('cifar_resnet20_kcla', global_pool='', device='meta')  # refused at construction


# (input, message fragment): forward refuses with a one-line AssertionError
FORWARD_CASES = [
    (lambda: torch.randn(3, 32, 32), 'expects a 4-D input [B, 3, H, W]'),
    (lambda: torch.randn(1, 1, 3, 32, 32), 'expects a 4-D input'),
    (lambda: torch.randn(1, 4, 32, 32), 'expects 3 input channels'),
    (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), 'expects a floating-point input'),
    (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.int64), 'expects a floating-point input'),
    (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.bool), 'expects a floating-point input'),
    (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.complex64), 'expects a floating-point input'),
    (lambda: torch.randn(1, 3, 0, 32), 'expects a non-empty image (H > 0 and W > 0)'),
    (lambda: torch.randn(2, 3, 32, 0), 'expects a non-empty image'),
    (lambda: torch.randn(0, 3, 0, 0), 'expects a non-empty image'),
]


@pytest.mark.parametrize('name', ['cifar_resnet20_kcla', 'cifar_resnet50_as_kv', 'resnet18_gradattn_rope'])
@pytest.mark.parametrize('make,fragment', FORWARD_CASES, ids=[f for _, f in FORWARD_CASES])
def test_bad_forward_input(name, make, fragment):
    model = timm.create_model(name).eval()
    x = make()
    for call in (model, model.forward_features, lambda t: model.forward_intermediates(t, intermediates_only=True)):
        with pytest.raises(AssertionError) as info:
            call(x)
        assert f'{name} {fragment}' in str(info.value) and '\n' not in str(info.value)


def test_forward_refusals_are_traceable_and_scriptable():
    """The shape / dtype checks are `torch._assert`s: kept by fx and TorchScript, constant messages."""
    from timm.models._features_fx import create_feature_extractor
    model = timm.create_model('cifar_resnet20_mrlal').eval()
    bad = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    for traced in (torch.jit.script(model), create_feature_extractor(model, return_nodes=['fc'])):
        with pytest.raises((AssertionError, torch.jit.Error), match='floating-point input'):
            traced(bad)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_empty_batch(name):
    """B == 0 gives (0, num_classes) in training, in eval with autograd and without (fused CPU kernels)."""
    model = timm.create_model(name)
    x = torch.randn(0, 3, 32, 32)
    out = model.train()(x)
    assert out.shape == (0, model.num_classes)
    out.sum().backward()
    model.eval()
    assert model(x).shape == (0, model.num_classes)
    with torch.no_grad():
        assert model(x).shape == (0, model.num_classes)


@pytest.mark.parametrize('name', PATHS)
def test_empty_batch_other_paths(name):
    """channels_last, forward_intermediates and features_only take an empty batch too."""
    model = timm.create_model(name).eval()
    x = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        ref = [t.shape[1:] for t in model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)]
        feats = model.forward_intermediates(x, intermediates_only=True)
        assert [t.shape[0] for t in feats] == [0] * len(ref) and [t.shape[1:] for t in feats] == ref
        cl = model.to(memory_format=torch.channels_last)
        assert cl(x.contiguous(memory_format=torch.channels_last)).shape == (0, model.num_classes)
        features = timm.create_model(name, features_only=True).eval()
        assert [t.shape[1:] for t in features(x)] == ref


@pytest.mark.parametrize('op', ['kcla', 'mrla_base'])
def test_fused_kernels_take_an_empty_batch(op):
    """The fused CPU kernels return the empty result (they used to refuse empty maps as aliased)."""
    if not native.available():
        pytest.skip(f'fused kernels unavailable: {native.last_error()}')
    name = f'cifar_resnet20_{"kcla" if op == "kcla" else "mrlab"}'
    model = timm.create_model(name).eval()
    x = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        fused = model.forward_intermediates(x, intermediates_only=True)
        with native.disabled():
            plain = model.forward_intermediates(x, intermediates_only=True)
    assert [t.shape for t in fused] == [t.shape for t in plain]


@pytest.mark.parametrize('name,hw', [('resnet50_kcla', (1, 1)), ('resnet50_as_out', (2, 3)),
                                     ('cifar_resnet20_mrlab', (1, 1)), ('resnet18_gradattn_nope', (1, 5))])
def test_tiny_images_still_work(name, hw):
    """The non-empty check refuses only H or W == 0: a 1-pixel image still runs (strided down to 1x1)."""
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


def test_constructor_errors_name_value_and_range():
    """The message carries the model, the argument, the allowed values and the value given, on one line."""
    with pytest.raises(ValueError) as info:
        timm.create_model('resnet50_kcla', head_dim=0, device='meta')
    msg = str(info.value)
    assert msg.startswith('resnet50_kcla: head_dim must be one of') and msg.endswith('got 0')
    assert 'every block width 256, 512, 1024, 2048' in msg and '\n' not in msg


# ---------------------------------------------------------------------------------------------------------------
# Environment switches: an invalid value is a one-line error naming the variable and the accepted values
# ---------------------------------------------------------------------------------------------------------------

SWITCH_CASES = [('TIMM_LAYERATTN_LEAN', v) for v in ('disabled', 'enable', '2', 'off1')] + [
    ('TIMM_LAYERATTN_NATIVE', 'disable')]


@pytest.mark.parametrize('var,value', SWITCH_CASES, ids=[f'{v}={x}' for v, x in SWITCH_CASES])
def test_bad_env_switch(monkeypatch, var, value):
    from timm_layerattn._utils import UserError
    from timm_layerattn._utils.env import EnvSwitchError, env_switch
    from timm_layerattn.layers import lean
    monkeypatch.setenv(var, value)
    with pytest.raises(EnvSwitchError) as info:
        env_switch(var)
    message = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert '\n' not in message
    assert f'{var}={value!r}' in message and '0, off, false, no, 1, on, true, yes, auto' in message
    with pytest.raises(EnvSwitchError, match=var):  # where the switch is read: a training forward
        (lean.mode if var.endswith('LEAN') else native.mode)()
    model = timm.create_model('cifar_resnet20_kcla').train()
    with pytest.raises(EnvSwitchError, match=var):
        model(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize('value,expected', [('', 'auto'), ('auto', 'auto'), (' Off ', 'off'), ('0', 'off'),
                                            ('no', 'off'), ('TRUE', 'on'), ('1', 'on'), ('yes', 'on')])
def test_good_env_switch(monkeypatch, value, expected):
    from timm_layerattn._utils.env import env_switch
    monkeypatch.setenv('TIMM_LAYERATTN_LEAN', value)
    assert env_switch('TIMM_LAYERATTN_LEAN') == expected


def test_bad_env_switch_cli(monkeypatch, capsys):
    from timm_layerattn.cli import main
    monkeypatch.setenv('TIMM_LAYERATTN_NATIVE', 'disable')
    assert main(['kernels']) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.count('\n') == 1
    assert "TIMM_LAYERATTN_NATIVE='disable' is not an accepted value" in err
