"""GradAttn (spec gradattn.md): parameter counts; the token neck against the official structure (torch's own
TransformerEncoder for No-PE / LPE, the notebook's RoPE layer maths for RoPE) loaded through the key map."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_layerattn  # noqa: F401
from timm_layerattn.models.gradattn import checkpoint_filter_fn, rotary_cos_sin
from timm_layerattn.tools.zoo import count_params

from _compile import assert_compiles_fullgraph

NAMES = ['resnet18_gradattn_nope', 'resnet18_gradattn_lpe', 'resnet18_gradattn_rope']
# spec §3: 10 classes / 3 ch, 100 classes, 10 classes / 1 ch, 200 classes
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
    # spec §3: d = 32, 16 heads, FFN 2 (the No-PE cell of some notebooks)
    model = timm.create_model('resnet18_gradattn_nope', num_classes=10, embed_dim=32, num_heads=16, mlp_dim=2,
                              device='meta')
    assert count_params(model) == 11_049_488


class RopeLayer(nn.Module):
    """The notebook's post-norm RoPE encoder layer, with its parameter names (written from the spec §2)."""

    def __init__(self, d=256, h=8, ff=512):
        super().__init__()
        self.h = h
        self.self_attn = nn.Module()
        for n in ('w_q', 'w_k', 'w_v'):
            setattr(self.self_attn, n, nn.Linear(d, d, bias=False))
        self.self_attn.w_o = nn.Linear(d, d)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        B, T, D = x.shape
        d = D // self.h
        q, k, v = (getattr(self.self_attn, n)(x).view(B, T, self.h, d) for n in ('w_q', 'w_k', 'w_v'))
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        emb = torch.cat([torch.outer(torch.arange(T).float(), inv_freq)] * 2, -1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

        def rot(t):
            return torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1) @ v
        x = self.norm1(x + self.self_attn.w_o(a.transpose(1, 2).reshape(B, T, D)))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class OfficialNeck(nn.Module):
    """Token projections, encoder and classifier with the notebook's names (`projections.i.2`, ...)."""

    def __init__(self, pos, num_classes=10):
        super().__init__()
        self.projections = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 256)) for c in (64, 64, 128, 256, 512)])
        if pos == 'rope':
            self.transformer_layers = nn.ModuleList([RopeLayer() for _ in range(3)])
        else:
            layer = nn.TransformerEncoderLayer(256, 8, 512, 0.1, batch_first=True)
            self.transformer_encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        if pos == 'lpe':
            self.positional_embedding = nn.Parameter(torch.randn(1, 5, 256))
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, feats):
        x = torch.stack([p(f) for p, f in zip(self.projections, feats)], 1)
        if hasattr(self, 'positional_embedding'):
            x = x + self.positional_embedding
        if hasattr(self, 'transformer_layers'):
            for layer in self.transformer_layers:
                x = layer(x)
        else:
            x = self.transformer_encoder(x)
        return self.classifier(x.mean(1))


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
