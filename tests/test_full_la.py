"""Full and linear layer attention (docs/design/full_layer_attention.md): parameter counts against the official
code, official checkpoints converted and run against an independent reference of the official forward
(tests/_official_full_la.py), the carried cache, the eq. 4 code's flat head split, and argument errors."""
import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.convert import convert_official_with_report, detect_official_family
from timm_layerattn.layers import FullLACfg, FullLayerAttn
from timm_layerattn.layers.full_la import FlatHeadLayerAttn

from _official import materialize, numel
from _official_full_la import flat_head_sources, official_full_la_forward, official_shapes_full_la
from _reference import bn, depthwise3x3

# Measured with the official code (CPU, random init, 10 / 1000 classes): the KCLA repository's
# layer_attention / linear_attention (bottleneck) and MRLA's resnet50_la_eq4.
OFFICIAL_PARAMS = {
    'cifar_resnet20_la': 230_286, 'cifar_resnet56_la': 621_046, 'cifar_resnet110_la': 1_207_186,
    'cifar_resnet20_linla': 230_286, 'cifar_resnet56_linla': 621_046, 'cifar_resnet110_linla': 1_207_186,
    'resnet50_la': 25_723_348,
}
# Deeper nets run the same code; random weights overflow the unnormalised linear attention there (in the
# official code too), so the parity of every depth with the real official modules is in the design notes.
CIFAR = [('cifar_resnet20_la', 'full_la', 20), ('cifar_resnet20_linla', 'linear_la', 20)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name', list(OFFICIAL_PARAMS))
def test_parameter_counts_match_the_official_code(name):
    model = timm.create_model(name, device='meta')
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAMS[name]
    layout = 'eq4' if name == 'resnet50_la' else 'cifar'
    depth = int(name.split('resnet')[1].split('_')[0])
    assert numel(official_shapes_full_la(layout, depth)) == n  # the generator is the official layout


@pytest.mark.parametrize('name,kind,depth', CIFAR, ids=[c[0] for c in CIFAR])
def test_official_cifar_checkpoint_converts_and_matches(name, kind, depth):
    sd = materialize(official_shapes_full_la('cifar', depth), seed=depth)
    out, report = convert_official_with_report(sd, name)
    assert report.family == kind and not report.dropped and report.num_tensors == len(sd)
    model = timm.create_model(name).eval()
    model.load_state_dict(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = official_full_la_forward(sd, 'cifar', kind, x, depth)
        assert _rel(model(x), ref) < 1e-4


@pytest.mark.parametrize('flat', [True, False], ids=['official-flat', 'per-head'])
def test_official_eq4_checkpoint_converts_and_matches(flat):
    sd = materialize(official_shapes_full_la('eq4'), seed=3)
    out, report = convert_official_with_report(sd, 'resnet50_la')
    assert report.family == 'full_la' and not report.dropped
    model = timm.create_model('resnet50_la', **({} if flat else dict(head_layout='per_head'))).eval()
    model.load_state_dict(out)
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        assert _rel(model(x), official_full_la_forward(sd, 'eq4', 'full_la', x, flat=flat)) < 1e-4
        other = official_full_la_forward(sd, 'eq4', 'full_la', x, flat=not flat)
        assert _rel(model(x), other) > 1e-3  # the two head splits are different functions


def test_layouts_are_told_apart_and_refused_where_they_do_not_fit():
    cifar = materialize(official_shapes_full_la('cifar', 20))
    eq4 = materialize(official_shapes_full_la('eq4'))
    # The KCLA repository's MRLA-base, full and linear layer attention CIFAR files have the same keys: detected as
    # MRLA-base, converted for whichever of the three the user names.
    assert detect_official_family(cifar) == 'mrla_base' and detect_official_family(eq4) == 'full_la'
    for target in ('cifar_resnet20_mrlab', 'cifar_resnet20_la', 'cifar_resnet20_linla'):
        assert convert_official(cifar, target)
    with pytest.raises(UserError, match="does not follow; use 'resnet50_la'"):
        convert_official(eq4, 'cifar_resnet20_la')
    with pytest.raises(UserError, match='use a cifar_resnet\\*_la model'):
        convert_official(cifar, 'resnet50_la')
    with pytest.raises(UserError, match='official full_la checkpoint'):
        convert_official(eq4, 'cifar_resnet20_linla')
    with pytest.raises(UserError, match='6-6-6 blocks per stage'):
        convert_official(materialize(official_shapes_full_la('cifar', 56)), 'cifar_resnet20_la')
    bad = dict(cifar)
    bad['stages.0.0.mrla.mrla.Wz.weight'] = bad['stages.0.0.mrla.mrla.Wq.weight']
    with pytest.raises(UserError, match='Wz'):
        convert_official(bad, 'cifar_resnet20_la')
    bad = {k: v for k, v in cifar.items() if not k.startswith('stages.1.0.bn_mrla.weight')}
    with pytest.raises(UserError, match='layer2.0.attn.norm.weight'):
        convert_official(bad, 'cifar_resnet20_la')


def test_official_files_load_through_timm_pretrained(tmp_path):
    """timm's `pretrained=True` with a file runs the family's filter (the same renaming)."""
    sd = materialize(official_shapes_full_la('cifar', 20), seed=5)
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, path)
    model = timm.create_model('cifar_resnet20_linla', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert _rel(model.eval()(x), official_full_la_forward(sd, 'cifar', 'linear_la', x, 20)) < 1e-4


def _module_reference(mod, cache, training):
    """The official module maths on our module: every cached map pooled and projected by this block."""
    x = cache[-1]
    b, c, h, w = x.shape
    d, g, t = mod.head_dim, c // mod.head_dim, len(cache)
    conv1d = lambda p, wt: torch.nn.functional.conv1d(p.unsqueeze(1), wt, padding=(wt.shape[-1] - 1) // 2)[:, 0]
    q = conv1d(x.mean((2, 3)), mod.query.weight).view(b, g, d)
    outs = []
    for j, m in enumerate(cache):
        k = conv1d(m.mean((2, 3)), mod.key.weight).view(b, g, d)
        outs.append((k, depthwise3x3(m, mod.value.weight)))
    if mod.linear:
        a = torch.stack([((torch.nn.functional.elu(q) + 1) * (torch.nn.functional.elu(k) + 1)).sum(-1)
                         for k, _ in outs], 1)
    else:
        a = torch.stack([(q * k).sum(-1) / d ** 0.5 for k, _ in outs], 1).softmax(1)
    o = sum(a[:, j].repeat_interleave(d, 1)[:, :, None, None] * v for j, (_, v) in enumerate(outs))
    o = bn(o, mod.norm, training)
    return x + (torch.relu(o) if mod.act else o)


@pytest.mark.parametrize('linear', [False, True], ids=['softmax', 'linear'])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_module_matches_reference_and_carries_the_raw_cache(linear, training):
    torch.manual_seed(0)
    mods = [FullLayerAttn(32, head_dim=8, linear=linear, first_in_stage=i == 0, act=not linear) for i in range(4)]
    state, cache = [], []
    for i, mod in enumerate(mods):
        with torch.no_grad():
            mod.norm.running_mean.normal_(0, 0.1)
            mod.norm.running_var.uniform_(0.5, 1.5)
        mod.train(training)
        x = torch.randn(2, 32, 5, 6).relu()
        keep = x.clone()
        cache.append(x)
        ref = _module_reference(mod, cache, training)
        with torch.no_grad():
            out, state = mod(x, x, state)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(x, keep), 'a cached map was modified'
        assert len(state) == i + 2 and state[0].shape == (2, i + 1, 32)
        assert all(s is c for s, c in zip(state[1:], cache))  # raw maps, not copies
        torch.testing.assert_close(state[0][:, -1], x.mean((2, 3)))
    first = FullLayerAttn(32, head_dim=8, first_in_stage=True).eval()
    _, state = first(x, x, state)
    assert len(state) == 2  # a new stage starts a new cache


def test_flat_heads_read_consecutive_chunks_of_the_flattened_cache():
    """The eq. 4 code's `view(b, heads, t, d)`: virtual head g reads chunks g*T..g*T+T-1 of the flattened
    [T, C] cache, i.e. (layer, head) pairs across layers; computed here by explicit gathering."""
    torch.manual_seed(0)
    c, d, t = 32, 8, 3
    mod = FlatHeadLayerAttn(c, head_dim=d, residual=False, act=False).eval()
    cache = [torch.randn(2, c, 4, 4).relu() for _ in range(t)]
    state = [torch.stack([m.mean((2, 3)) for m in cache[:-1]], 1)] + cache[:-1]
    with torch.no_grad():
        out, _ = mod(cache[-1], cache[-1], state)
    sources = flat_head_sources(t, c, d)
    assert sources[0] == [(0, 0), (0, 1), (0, 2)] and sources[3] == [(2, 1), (2, 2), (2, 3)]
    conv1d = lambda p, wt: torch.nn.functional.conv1d(p.unsqueeze(1), wt, padding=(wt.shape[-1] - 1) // 2)[:, 0]
    q = conv1d(cache[-1].mean((2, 3)), mod.query.weight)
    heads = []
    for g, src in enumerate(sources):
        chunk = lambda l, h: slice(h * d, h * d + d)
        k = torch.stack([conv1d(cache[l].mean((2, 3)), mod.key.weight)[:, chunk(l, h)] for l, h in src], 1)
        v = torch.stack([depthwise3x3(cache[l], mod.value.weight)[:, chunk(l, h)] for l, h in src], 1)
        a = ((q[:, g * d:g * d + d].unsqueeze(1) * k).sum(-1) / d ** 0.5).softmax(1)
        heads.append((a[:, :, None, None, None] * v).sum(1))
    torch.testing.assert_close(out, bn(torch.cat(heads, 1), mod.norm, False), rtol=1e-5, atol=1e-5)


def test_drop_path_goes_to_the_attention_branch_or_the_trunk():
    cifar = timm.create_model('cifar_resnet20_la', drop_path_rate=0.1)
    assert cifar.layer1[0].attn.drop_path.drop_prob == 0.1 and cifar.layer1[0].drop_path is None
    eq4 = timm.create_model('resnet50_la', drop_path_rate=0.1)  # no attention residual: timm's stochastic depth
    assert isinstance(eq4.layer1[0].attn.drop_path, torch.nn.Identity)
    assert eq4.layer4[2].drop_path.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize('name,kwargs,exc,fragment', [
    ('cifar_resnet20_la', dict(head_dim=3), ValueError,
     'cifar_resnet20_la: head_dim must be one of 1, 2, 4, 8, 16, 32, 64 (channels per head'),
    ('cifar_resnet20_linla', dict(head_dim=8.0), TypeError, 'got 8.0'),
    ('resnet50_la', dict(head_dim=0), ValueError, 'head_dim must be one of'),
    ('resnet50_la', dict(head_layout='heads'), ValueError, "head_layout must be one of ('per_head', 'flat')"),
    ('cifar_resnet20_la', dict(head_layout='flat'), TypeError, "does not take 'head_layout'"),
    ('cifar_resnet20_la', dict(drop_path_rate=1.0), ValueError, 'drop_path_rate must be a probability'),
])
def test_bad_kwargs(name, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment.replace('(', r'\(').replace(')', r'\)')):
        timm.create_model(name, **kwargs)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match=r"FullLACfg: type must be one of \('full_la', 'linear_la'\), got 'la'"):
        FullLACfg('la', head_dim=16)
    with pytest.raises(ValueError, match="head_layout must be one of"):
        FullLACfg('full_la', head_dim=16, head_layout='mixed')
    with pytest.raises(ValueError, match=r'FullLayerAttn: channels \(30\) must be divisible by head_dim \(8\)'):
        FullLayerAttn(30, head_dim=8)
    with pytest.raises(TypeError, match="FullLayerAttn: linear must be True or False, got 1"):
        FullLayerAttn(32, linear=1)


@pytest.mark.parametrize('name', ['cifar_resnet110_linla', 'cifar_resnet110_la'])
def test_untrained_deep_nets_are_finite(name):
    """The linear nets start their branch BatchNorm at zero (#fla-init): with the official init the untrained
    deep linear nets overflow in eval."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    norms = [m.norm.weight for m in model.modules() if isinstance(m, FullLayerAttn)]
    assert all(bool((w == 0).all()) == name.endswith('linla') for w in norms)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
