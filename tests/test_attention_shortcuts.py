"""Attention shortcuts (docs/design/attention_shortcuts.md): the operator against Eq 3.2 written out per pixel
(#as-mechanism), the networks against the pseudocode (#as-variants), the parameter tables (#as-param-counts),
flags, layout and per-model contract. The `#as-...` anchors are sections of that page."""
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers.shortcut import (
    AttentionShortcut, ShortcutCfg, ShortcutProj, depth_attention, depth_attention_sdpa)
from timm_layerattn.models.resnet_as import as_arch, checkpoint_filter_fn
from timm_layerattn.models.resnet_trunk import ResNetLA
from timm_layerattn.tools.zoo import count_params

from _reference import explicit_depth_attention, ref_block_sites, ref_stage_sites

AS_VARIANTS = ('as_out', 'as_kv', 'as_stages')
CIFAR_MODELS = [f'cifar_resnet50_{k}' for k in AS_VARIANTS] + [
    'cifar_resnet50', 'cifar_resnet50_half', 'cifar_resnet50_plain']
IN_MODELS = [f'resnet{d}_{k}' for d in (50, 101) for k in AS_VARIANTS] + ['resnet50_half', 'resnet50_plain']

# Parameter counts (#as-params-main): 10 classes, 100 classes, 1000 classes with the CIFAR stem, 1000 classes with the
# ImageNet stem.
PARAMS = {
    'as_out': (12_603_018, 12_614_628, 12_730_728, 12_746_088),
    'as_kv': (16_073_674, 16_119_844, 16_581_544, 16_589_224),
    'as_stages': (30_274_634, 30_459_044, 32_303_144, 32_310_824),
    '': (23_520_842, 23_705_252, 25_549_352, 25_557_032),
    'half': (16_741_450, 16_833_700, 17_756_200, 17_763_880),
    'plain': (20_744_266, 20_928_676, 22_772_776, 22_780_456),
}


def test_depth_attention_is_eq_3_2_per_pixel():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 3, 2, dtype=torch.float64, generator=g)
    k = torch.randn(2, 4, 8, 3, 2, dtype=torch.float64, generator=g)
    v = torch.randn(2, 4, 8, 3, 2, dtype=torch.float64, generator=g)
    ref = explicit_depth_attention(q, k, v, num_heads=4)
    torch.testing.assert_close(depth_attention(q, k, v, 4), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(depth_attention_sdpa(q, k, v, 4), ref, rtol=0, atol=1e-12)


def test_depth_attention_equal_keys_give_mean_of_values_and_no_cross_talk():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 16, 4, 4, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 16, 4, 4, dtype=torch.float64, generator=g).expand(1, 5, 16, 4, 4)
    v = torch.randn(1, 5, 16, 4, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(depth_attention(q, k, v, 4), v.mean(1), rtol=0, atol=1e-12)
    # per pixel: changing one pixel's entries changes only that pixel's output
    k2, v2 = k.clone(), v.clone()
    k2[..., 1, 2] += 1.
    v2[..., 1, 2] += 1.
    diff = (depth_attention(q, k2, v2, 4) - depth_attention(q, k, v, 4)).abs().sum(1)
    assert diff[0, 1, 2] > 0 and diff.sum() == diff[0, 1, 2]


@pytest.mark.parametrize('downsample', ['subsample', 'conv'])
def test_site_computes_eq_3_2_with_cache_conversion(downsample):
    """A non-first site: cache brought to the new shape, newest K/V appended, per-pixel attention, W^O."""
    torch.manual_seed(0)
    c_in, c = (8, 8) if downsample == 'subsample' else (4, 8)
    site = AttentionShortcut(c, num_heads=4, cache_dim=c_in, cache_stride=2, downsample=downsample).double()
    proj = ShortcutProj(c).double()
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)  # odd size: the cache (5x5) subsamples to ceil(5/2)
    cache = [torch.randn(2, 3, c_in, 5, 5, dtype=torch.float64) for _ in range(2)]
    out, (K, V) = site.forward_weights(x, cache, proj.weights())

    def conv(t, m):
        return F.conv2d(t, m.weight, stride=m.stride)

    def convert(t, adapter):
        entries = [t[:, e] for e in range(t.shape[1])]
        if downsample == 'subsample':
            return torch.stack([e[..., ::2, ::2] for e in entries], 1)
        return torch.stack([conv(e, adapter) for e in entries], 1)

    k_ref = torch.cat([convert(cache[0], site.kv_adapt_k), conv(x, proj.k)[:, None]], 1)
    v_ref = torch.cat([convert(cache[1], site.kv_adapt_v), conv(x, proj.v)[:, None]], 1)
    out_ref = conv(explicit_depth_attention(conv(x, site.q), k_ref, v_ref, 4), proj.o)
    torch.testing.assert_close(K, k_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(V, v_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    assert K.shape == (2, 4, c, 3, 3)


def test_first_site_is_wo_v1_and_owns_no_query():
    """#as-site-placement: one entry, softmax identically 1: g = W^O V_1 whatever the query."""
    site = AttentionShortcut(8, cache_dim=None).double()
    proj = ShortcutProj(8).double()
    assert site.q is None and not site.has_query
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    out, (K, V) = site.forward_weights(x, [], proj.weights())
    torch.testing.assert_close(out, proj.o(proj.v(x)))
    assert K.shape == V.shape == (1, 1, 8, 4, 4)


def _randomize_norms(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return model


@pytest.mark.parametrize('kind,ref', [('as_out', ref_block_sites), ('as_kv', ref_block_sites),
                                      ('as_stages', ref_stage_sites)])
def test_network_matches_spec_pseudocode(kind, ref):
    """Whole-network wiring (cache placement, conversions, site 1, no caching of the last output) in float64,
    on the CIFAR architecture with fewer blocks per stage (same code paths, depths 2-2-3-2)."""
    torch.manual_seed(0)
    model = ResNetLA(replace(as_arch(kind, stem_type='cifar'), layers=(2, 2, 3, 2)), num_classes=7)
    model = _randomize_norms(model).double().eval()
    img = torch.randn(2, 3, 17, 15, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(img), ref(model, img), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kind', PARAMS)
def test_param_counts_match_spec_table(kind):
    cifar = 'cifar_resnet50' + (f'_{kind}' if kind else '')
    imagenet = {'': None, 'half': 'resnet50_half', 'plain': 'resnet50_plain'}.get(kind, f'resnet50_{kind}')
    counts = [count_params(timm.create_model(cifar, num_classes=n, device='meta')) for n in (10, 100, 1000)]
    if imagenet is not None:
        counts.append(count_params(timm.create_model(imagenet, device='meta')))
    assert tuple(counts) == PARAMS[kind][:len(counts)]


def test_param_counts_resnet101_and_flags():
    # ResNet-101 counts (#as-params-main) are 10 classes with the CIFAR stem: ImageNet stem minus its wider 7x7 conv1
    for name, expected in (('resnet101_as_out', 24_044_426), ('resnet101_as_kv', 29_469_130),
                           ('resnet101_as_stages', 49_266_762)):
        model = timm.create_model(name, num_classes=10, device='meta')
        assert count_params(model) - (49 - 9) * 3 * model.conv1.out_channels == expected, name
    # the sharing flags (#as-params-sharing-readings)
    assert count_params(timm.create_model('cifar_resnet50_as_out', q_proj='shared', device='meta')) == 12_373_642
    assert count_params(timm.create_model('cifar_resnet50_as_kv', kv_adapter='shared', device='meta')) == 15_901_642
    # breakdown of AS_KV (#as-params-breakdown)
    model = timm.create_model('cifar_resnet50_as_kv', device='meta')
    sd = {k: v.numel() for k, v in model.named_parameters()}
    assert sum(v for k, v in sd.items() if k.endswith('attn_in.q.weight')) == 995_328
    assert sum(v for k, v in sd.items() if k.startswith('as_proj.')) == 1_044_480
    assert sum(v for k, v in sd.items() if '.kv_adapt_' in k) == 344_064
    stages = timm.create_model('cifar_resnet50_as_stages', device='meta')
    assert sum(p.numel() for k, p in stages.named_parameters() if '.attn_in.norm.' in k) == 3_584
    no_ln = timm.create_model('cifar_resnet50_as_stages', pre_ln=False, device='meta')
    assert count_params(no_ln) == 30_274_634 - 3_584


def test_state_dict_layout_is_single_owner_and_exports_to_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file
    model = timm.create_model('cifar_resnet50_as_kv')
    sd = model.state_dict()
    assert sorted(k for k in sd if k.startswith('as_proj.')) == sorted(
        f'as_proj.w{c}.{p}.weight' for c in (64, 128, 256, 512) for p in 'kvo')
    assert 'layer1.0.attn_in.q.weight' not in sd and 'layer1.1.attn_in.q.weight' in sd  # no W^Q at the first site
    assert 'layer2.1.attn_in.kv_adapt_k.weight' in sd
    assert 'layer1.0.ln3.weight' in sd and 'layer1.0.bn3.weight' not in sd
    save_file(sd, tmp_path / 'm.safetensors')  # refuses aliased tensors
    other = timm.create_model('cifar_resnet50_as_kv', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'm.safetensors')))
    for k, v in load_file(tmp_path / 'm.safetensors').items():
        assert torch.equal(other.state_dict()[k], v)


def test_baselines_keep_timm_resnet_names_and_as_stages_warm_starts_from_resnet50():
    ref = timm.create_model('resnet50', num_classes=10).state_dict()
    sd = timm.create_model('cifar_resnet50').state_dict()
    assert list(sd) == list(ref) and all(sd[k].shape == ref[k].shape for k in sd if k != 'conv1.weight')
    model = timm.create_model('resnet50_as_stages')
    stock = timm.create_model('resnet50').state_dict()
    model.load_state_dict(checkpoint_filter_fn(stock, model))  # strict: only the site keys are filled in
    assert torch.equal(model.get_submodule('layer4.2.conv3').weight, stock['layer4.2.conv3.weight'])
    assert all(k.startswith(('layer2.attn_in.', 'layer3.attn_in.', 'layer4.attn_in.'))
               for k in model.state_dict() if k not in stock)


def test_kwargs_are_validated():
    with pytest.raises(TypeError, match='as_dim'):
        timm.create_model('cifar_resnet50_as_kv', as_dim=64)
    with pytest.raises(TypeError, match='kv_adapter'):
        timm.create_model('cifar_resnet50_as_out', kv_adapter='shared')
    with pytest.raises(TypeError, match='q_proj'):
        timm.create_model('cifar_resnet50', q_proj='shared')
    with pytest.raises(ValueError, match='q_proj'):
        timm.create_model('cifar_resnet50_as_out', q_proj='sometimes')
    with pytest.raises(ValueError, match='divisible'):
        timm.create_model('cifar_resnet50_as_out', as_heads=3)
    with pytest.raises(ValueError, match='no residual branch'):
        timm.create_model('cifar_resnet50_as_out', drop_path_rate=0.1)
    with pytest.raises(TypeError):
        timm.create_model('cifar_resnet50_as_out', heads=4)
    model = timm.create_model('cifar_resnet50_as_out', as_dim=64, as_heads=2, act_after_ln=False, device='meta')
    assert model.num_features == 64 and model.layer3[0].attn_in.num_heads == 2
    assert isinstance(model.layer1[0].act3, torch.nn.Identity)
    assert ShortcutCfg(placement='stage').q_proj == 'per_site'


@pytest.mark.parametrize('name', CIFAR_MODELS + IN_MODELS)
def test_every_model_forward_backward_features(name):
    """Per model: all parameters get a gradient, features have the documented channels (#as-features) and
    reductions."""
    model = timm.create_model(name, num_classes=5)
    s = 32 if name.startswith('cifar') else 64
    x = torch.randn(2, 3, s, s)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    chans = {'as_out': [128] * 5, 'as_kv': [64, 64, 128, 256, 512]}
    kind = next((k for k in chans if k in name), None)
    expected = chans[kind] if kind else [64] + [w * (2 if 'half' in name else 4) for w in (64, 128, 256, 512)]
    assert [f['num_chs'] for f in model.feature_info] == expected
    red = [1, 1, 2, 4, 8] if name.startswith('cifar') else [2, 4, 8, 16, 32]
    assert [f['reduction'] for f in model.feature_info] == red
    model.eval()
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape[1] for t in feats] == expected


@pytest.mark.parametrize('name,size', [('cifar_resnet50_as_out', (33, 33)), ('cifar_resnet50_as_kv', (97, 131)),
                                       ('resnet50_as_kv', (225, 225)), ('resnet50_as_out', (33, 65))])
def test_odd_input_sizes(name, size):
    """Subsampling and stride-2 convs both give ceil(H/2): cache and outputs stay aligned."""
    model = timm.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, model.num_classes)


@pytest.mark.parametrize('kind,kwargs', [('as_out', dict(q_proj='shared')), ('as_kv', dict(kv_adapter='shared')),
                                         ('as_stages', {})])
def test_torchscript_block_and_stage_sites(kind, kwargs):
    """Block sites receive the shared projections' weights (TorchScript passes tensors, not modules)."""
    model = timm.create_model(f'cifar_resnet50_{kind}', **kwargs).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_torch_compile_fullgraph():
    """No graph break on the registered AS_out (dynamo explain), and a compiled shallower AS_KV matches eager."""
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(timm.create_model('cifar_resnet50_as_out').eval())(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    model = ResNetLA(replace(as_arch('as_kv', stem_type='cifar'), layers=(1, 2, 1, 1)), num_classes=3).eval()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_prune_keeps_only_used_projections():
    model = timm.create_model('cifar_resnet50_as_kv', q_proj='shared')
    model.prune_intermediate_layers(indices=[2])
    assert sorted(model.as_proj.keys()) == ['w128', 'w64']
    x = torch.randn(2, 3, 32, 32)
    model.forward_intermediates(x, indices=[2], intermediates_only=True)[0].sum().backward()
    assert all(p.grad is not None for p in model.parameters())
