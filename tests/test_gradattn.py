"""GradAttn (docs/design/gradattn.md#ga-architecture): parameter counts; the token neck against the official
structure (`OfficialNeck` of tests/_reference.py: torch's own TransformerEncoder for No-PE / LPE, the notebook's
RoPE layer maths for RoPE) loaded through the key map."""
import math

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401
from timm_layerattn.models.gradattn import checkpoint_filter_fn, rotary_cos_sin
from timm_layerattn.tools.zoo import count_params

from _compile import assert_compiles_fullgraph
from _reference import OfficialNeck

NAMES = ['resnet18_gradattn_nope', 'resnet18_gradattn_lpe', 'resnet18_gradattn_rope']
# docs/design/gradattn.md#ga-param-counts: 10 classes / 3 ch, 100 classes, 10 classes / 1 ch, 200 classes
PARAMS = {
    'resnet18_gradattn_nope': (12_849_994, 12_873_124, 12_843_722, 12_898_824),
    'resnet18_gradattn_lpe': (12_851_274, 12_874_404, 12_845_002, 12_900_104),
    'resnet18_gradattn_rope': (12_847_690, 12_870_820, 12_841_418, 12_896_520),
}


@pytest.mark.parametrize('name', NAMES)
def test_param_counts(name):
    def n(**kw):
        return count_params(timm.create_model(name, device='meta', **kw))
    assert (n(num_classes=10), n(num_classes=100), n(num_classes=10, in_chans=1), n(num_classes=200)) == PARAMS[name]


def test_param_count_of_the_notebooks_quirky_no_pe_config():
    # docs/design/gradattn.md#ga-config-quirk: d = 32, 16 heads, FFN 2 (the No-PE cell of some notebooks)
    model = timm.create_model('resnet18_gradattn_nope', num_classes=10, embed_dim=32, num_heads=16, mlp_dim=2,
                              device='meta')
    assert count_params(model) == 11_049_488


@pytest.mark.parametrize('name', NAMES)
def test_matches_official_structure_through_key_conversion(name):
    torch.manual_seed(0)
    pos = name.rsplit('_', 1)[1]
    official = OfficialNeck(pos).eval()
    model = timm.create_model(name, num_classes=10).eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(('neck.', 'fc.'))}  # shared trunk names
    sd.update(official.state_dict())
    if pos == 'rope':
        sd['transformer_layers.0.self_attn.rotary_emb.inv_freq'] = torch.ones(16)  # the notebook's buffer: dropped
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(model(x), official(feats), rtol=1e-5, atol=1e-5)
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_rotary_tables():
    cos, sin = rotary_cos_sin(5, 32)
    assert cos.shape == (5, 32) and torch.equal(cos[0], torch.ones(32)) and torch.equal(cos[:, :16], cos[:, 16:])
    torch.testing.assert_close(sin[3, 1], torch.tensor(math.sin(3 * 10000 ** (-2 / 32))))


@pytest.mark.parametrize('name', NAMES)
def test_every_model_contract(name):
    model = timm.create_model(name, num_classes=5, encoder_drop_rate=0.)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert [f['num_chs'] for f in model.feature_info] == [64, 64, 128, 256, 512]
    assert [f['reduction'] for f in model.feature_info] == [4, 4, 8, 16, 32]
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 256, 1, 5) and model.num_features == 256
        torch.testing.assert_close(model.forward_head(tokens), model(x))
        feats = timm.create_model(name, features_only=True).eval()
        feats.model.load_state_dict(model.state_dict(), strict=False)
        assert feats.model.neck is None  # the token encoder is pruned for features, not replayed
        torch.testing.assert_close(feats(x), model.forward_intermediates(x, intermediates_only=True))
        for size in ((28, 28), (97, 131)):
            assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_scripting_and_compile():
    model = timm.create_model('resnet18_gradattn_rope').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref)
    assert_compiles_fullgraph(model, x, ref)


def test_drop_path_rate_is_rejected():
    with pytest.raises(ValueError, match='no residual branch'):
        timm.create_model('resnet18_gradattn_nope', drop_path_rate=0.1)
