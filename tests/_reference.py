"""Reference implementations for the tests: straightforward versions of the documented formulas.

Written independently of the package code. One implementation per operation; where two functions compute the
same maths on different inputs (our modules vs official-layout state dicts), each docstring says which it is.

Sections:
    Layer attention, our modules (docs/design/layer_attention.md; the `#la-...` anchors are sections of that
        page): per-head 5-D views like the official code, explicit weighted sums over lists of earlier block
        outputs, BatchNorm and convs through `torch.nn.functional`. Only the *parameters* are read from the
        package modules (`ref_kcla`, `ref_mrla_light`, `ref_mrla_base`, `ref_model_features`).
    Layer attention, official state dicts: the official networks' forward reading the *official* tensors
        (official key names, KCLA's recurrent (U, Z) state): `official_forward` and its cells.
    CNNtention (docs/design/cnntention.md#cnn-modules): the official modules' maths on official parameter names.
    GradAttn (docs/design/gradattn.md#ga-variants): the notebook's token neck with its parameter names.
    Attention shortcuts (docs/design/attention_shortcuts.md, `#as-...` anchors): Eq 3.2 per pixel, and the
        networks' pseudocode on the package's layers.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from _official import kcla_init_cell, official_block_prefixes

# ---------------------------------------------------------------------------------------------------------------
# Layer attention (KCLA / MRLA), our modules
# ---------------------------------------------------------------------------------------------------------------

def bn(x: torch.Tensor, norm: torch.nn.BatchNorm2d, training: bool) -> torch.Tensor:
    """BatchNorm with the batch statistics (`training`) or the running ones; `norm` is a BatchNorm2d or a
    `StateNorm` (parameters of a state dict)."""
    if training:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean = norm.running_mean.view(1, -1, 1, 1)
        var = norm.running_var.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def eca(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k-tap zero-padded filter along the channel axis of `p` `[B, C]`."""
    k = weight.shape[-1]
    return F.conv1d(p[:, None, :], weight, padding=(k - 1) // 2)[:, 0, :]


def depthwise3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3x3 depthwise conv."""
    return F.conv2d(x, weight, padding=1, groups=x.shape[1])


def heads(t: torch.Tensor, g: int) -> torch.Tensor:
    """`[B, C]` -> `[B, g, d]`."""
    return t.reshape(t.shape[0], g, -1)


class KCLAHistory:
    """KCLA history as an explicit list of (weight per head `[B, g]`, tensor `[B, C, H, W]`) tokens."""

    def __init__(self):
        self.tokens: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def normalised(self, eps: Optional[float], g: int) -> torch.Tensor:
        """sum_j w_j x_j / (sum_j w_j + eps), per head (eps None: no epsilon)."""
        num = 0.
        den = 0.
        for w, t in self.tokens:
            B, C, H, W = t.shape
            num = num + w.view(B, g, 1, 1, 1) * t.view(B, g, C // g, H, W)
            den = den + w.view(B, g, 1, 1, 1)
        out = num / (den + eps) if eps is not None else num / den
        return out.reshape(self.tokens[-1][1].shape)


def ref_kcla(cell, x: torch.Tensor, history: Optional[KCLAHistory], training: bool) -> Tuple[torch.Tensor, KCLAHistory]:
    """KCLA cell (#la-kcla-forward, #la-kcla-rebuild) with the history kept as an explicit token list.

    `cell` provides the parameters: q, k, v, head_gate, norm, norm_d and (init cells) hist_proj,
    hist_k, hist_norm. `training` selects batch statistics in the BatchNorms; drop path must be 0.
    """
    B, C, H, W = x.shape
    g = cell.num_heads
    s_inv = cell.norm_d.view(1, g)
    if history is not None and cell.hist_norm is not None:
        prev_g = history.tokens[-1][1].shape[1] // (C // g)
        a = history.normalised(None, prev_g)  # U / Z, no epsilon
        if cell.hist_proj is not None:
            proj = cell.hist_proj
            a = F.conv2d(a, proj.weight, stride=proj.stride, groups=proj.groups)
        a = bn(a, cell.hist_norm, training)
        kappa = heads(eca(a.mean((2, 3)), cell.hist_k.weight), g)
        beta = torch.exp(torch.clamp(kappa.norm(dim=-1) / s_inv, max=10))
        history = KCLAHistory()
        history.tokens.append((beta, a))
    p = x.mean((2, 3))
    q = heads(eca(p, cell.q.weight), g)
    k = heads(eca(p, cell.k.weight), g)
    k_norm = k.norm(dim=-1)
    alpha = torch.exp(torch.clamp(k_norm / s_inv, max=10))
    history = history if history is not None else KCLAHistory()
    history.tokens.append((alpha, x))
    value = depthwise3x3(history.normalised(1e-3, g), cell.v.weight)
    score = (q * k).sum(-1) / k_norm
    gate = torch.sigmoid(score @ cell.head_gate.weight.t())  # [B, g]
    gated = (gate.view(B, g, 1, 1, 1) * value.view(B, g, C // g, H, W)).view(B, C, H, W)
    out = x + torch.relu(bn(gated, cell.norm, training))
    return out, history


def ref_mrla_light(mod, x: torch.Tensor, shortcut: torch.Tensor, training: bool) -> torch.Tensor:
    """MRLA-light (#la-mrla-light-forward): x + BN(sigmoid(<Q_h, K_h> / sqrt(d)) V_h + lambda * shortcut)."""
    B, C, H, W = x.shape
    g = mod.num_heads
    p = x.mean((2, 3))
    q = heads(eca(p, mod.q.weight), g)
    k = heads(eca(p, mod.k.weight), g)
    a = torch.sigmoid((q * k).sum(-1) / math.sqrt(C // g))
    v = depthwise3x3(x, mod.v.weight).view(B, g, C // g, H, W)
    m = (a.view(B, g, 1, 1, 1) * v).view(B, C, H, W) + mod.lambda_t.view(1, C, 1, 1) * shortcut
    return x + bn(m, mod.norm, training)


def ref_mrla_base(mod, x: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor], training: bool):
    """MRLA-base (#la-mrla-base-forward): softmax over the keys of the stage's blocks so far, weighted sum of values.

    `keys` / `values` are the lists of earlier blocks of the stage (empty at the stage's first block);
    this block's key / value are appended.
    """
    B, C, H, W = x.shape
    g = mod.num_heads
    d = C // g
    p = x.mean((2, 3))
    q = heads(eca(p, mod.q.weight), g)
    keys = keys + [heads(eca(p, mod.k.weight), g)]
    values = values + [depthwise3x3(x, mod.v.weight)]
    out = torch.zeros_like(x).view(B, g, d, H, W)
    logits = torch.stack([(q * kj).sum(-1) / math.sqrt(d) for kj in keys], dim=-1)  # [B, g, T]
    attn = torch.softmax(logits, dim=-1)
    for j, vj in enumerate(values):
        out = out + attn[:, :, j].view(B, g, 1, 1, 1) * vj.view(B, g, d, H, W)
    out = torch.relu(bn(out.view(B, C, H, W), mod.norm, training))
    return x + out, keys, values


def trunk_bottleneck(block, x: torch.Tensor, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain ResNet v1.5 bottleneck of `block`: returns (post-ReLU output, shortcut)."""
    shortcut = x
    if block.downsample is not None:
        conv, norm = block.downsample[0], block.downsample[1]
        shortcut = bn(F.conv2d(x, conv.weight, stride=conv.stride), norm, training)
    y = torch.relu(bn(F.conv2d(x, block.conv1.weight), block.bn1, training))
    c2 = block.conv2
    y = torch.relu(bn(F.conv2d(y, c2.weight, stride=c2.stride, padding=c2.padding, dilation=c2.dilation),
                      block.bn2, training))
    y = bn(F.conv2d(y, block.conv3.weight), block.bn3, training)
    return torch.relu(y + shortcut), shortcut


def ref_model_features(model, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """Whole-network reference forward of a bottleneck ResNetLA (stem, stages, attention wiring)."""
    if isinstance(model.conv1, torch.nn.Sequential):
        s = model.conv1
        y = torch.relu(bn(F.conv2d(x, s[0].weight, stride=2, padding=1), s[1], training))
        y = torch.relu(bn(F.conv2d(y, s[3].weight, padding=1), s[4], training))
        y = F.conv2d(y, s[6].weight, padding=1)
    else:
        c = model.conv1
        y = F.conv2d(x, c.weight, stride=c.stride, padding=c.padding)
    y = torch.relu(bn(y, model.bn1, training))
    if isinstance(model.maxpool, torch.nn.MaxPool2d):
        y = F.max_pool2d(y, 3, 2, 1)
    history = None
    for stage in model.stages():
        keys, values = [], []
        for block in stage:
            y, shortcut = trunk_bottleneck(block, y, training)
            attn = block.attn
            kind = type(attn).__name__
            if kind == 'KCLA':
                y, history = ref_kcla(attn, y, history, training)
            elif kind == 'MRLALight':
                y = ref_mrla_light(attn, y, shortcut, training)
            elif kind == 'MRLABase':
                y, keys, values = ref_mrla_base(attn, y, keys, values, training)
            else:
                assert attn is None, kind
    return y


# ---------------------------------------------------------------------------------------------------------------
# Layer attention (KCLA / MRLA), official state dicts
# ---------------------------------------------------------------------------------------------------------------

class StateNorm:
    """The eval-mode BatchNorm parameters under `prefix` of a state dict, in the attributes `bn` reads."""

    def __init__(self, sd: Dict[str, torch.Tensor], prefix: str, eps: float = 1e-5):
        self.weight, self.bias = sd[prefix + 'weight'], sd[prefix + 'bias']
        self.running_mean, self.running_var = sd[prefix + 'running_mean'], sd[prefix + 'running_var']
        self.eps = eps


def bn_state(x: torch.Tensor, sd: Dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Eval-mode BatchNorm with the running statistics of `sd` (`bn` on a state dict)."""
    return bn(x, StateNorm(sd, prefix), training=False)


def official_kcla(x, state, sd, p, init):
    """KCLA cell (#la-kcla-forward / #la-kcla-rebuild) of an official state dict, with the official recurrent
    (U, Z) state. `ref_kcla` is the same cell on our modules with the history kept as an explicit token list."""
    b, c, h, w = x.shape
    norm_d = sd[p + 'norm_d'].view(1, -1)
    g = norm_d.shape[1]
    d = c // g
    if state is not None and init:
        u, z = state
        a = (u / z).reshape(b, -1, *u.shape[-2:])
        if a.shape[1] != c:
            a = F.conv2d(a, sd[p + 'adjust_channel.weight'], stride=2, groups=g)
        a = bn_state(a, sd, p + 'u_bn.')
        kappa = eca(a.mean((2, 3)), sd[p + 'u_Wk.weight']).view(b, g, d)
        beta = torch.exp(torch.clamp(torch.norm(kappa, dim=2) / norm_d, max=10))
        state = (beta.view(b, g, 1, 1, 1) * a.view(b, g, d, *a.shape[-2:]), beta.view(b, g, 1, 1, 1))
    pooled = x.mean((2, 3))
    q = eca(pooled, sd[p + 'Wq.weight']).view(b, g, d)
    k = eca(pooled, sd[p + 'Wk.weight']).view(b, g, d)
    n = torch.norm(k, dim=2)
    alpha = torch.exp(torch.clamp(n / norm_d, max=10)).view(b, g, 1, 1, 1)
    xa = alpha * x.view(b, g, d, h, w)
    u, z = (xa, alpha) if state is None else (state[0] + xa, state[1] + alpha)
    a = (u / (z + 1e-3)).reshape(b, c, h, w)
    v = depthwise3x3(a, sd[p + 'Wv.weight'])
    e = (q * k).sum(2) / n
    gate = torch.sigmoid(e @ sd[p + 'head_att.weight'].t()).repeat_interleave(d, 1)[:, :, None, None]
    return x + F.relu(bn_state(gate * v, sd, p + 'bn_attention.')), (u, z)


def official_mrla_light(x, shortcut, sd, p, d):
    """MRLA-light (#la-mrla-light-forward) of an official state dict (`ref_mrla_light`: on our modules)."""
    b, c = x.shape[:2]
    g = c // d
    pooled = x.mean((2, 3))
    q = eca(pooled, sd[p + 'mrla.mrla.Wq.weight']).view(b, g, d)
    k = eca(pooled, sd[p + 'mrla.mrla.Wk.weight']).view(b, g, d)
    a = torch.sigmoid((q * k).sum(2) * (1 / math.sqrt(d))).repeat_interleave(d, 1)[:, :, None, None]
    v = depthwise3x3(x, sd[p + 'mrla.mrla.Wv.weight'])
    return x + bn_state(a * v + sd[p + 'mrla.lambda_t'] * shortcut, sd, p + 'bn_mrla.')


def official_mrla_base(x, cache, sd, p, d, first):
    """MRLA-base (#la-mrla-base-forward) of an official state dict: softmax over the keys of the stage's earlier
    blocks, cached values summed (`ref_mrla_base`: on our modules)."""
    b, c = x.shape[:2]
    g = c // d
    pooled = x.mean((2, 3))
    q = eca(pooled, sd[p + 'mrla.mrla.Wq.weight']).view(b, g, d)
    k = eca(pooled, sd[p + 'mrla.mrla.Wk.weight']).view(b, 1, g, d)
    v = depthwise3x3(x, sd[p + 'mrla.mrla.Wv.weight'])
    keys, values = (k, [v]) if first else (torch.cat([cache[0], k], 1), cache[1] + [v])
    attn = ((q.unsqueeze(1) * keys).sum(-1) / math.sqrt(d)).softmax(dim=1)  # [B, T, g]
    o = sum(attn[:, j].repeat_interleave(d, 1)[:, :, None, None] * values[j] for j in range(len(values)))
    return x + F.relu(bn_state(o, sd, p + 'bn_mrla.')), (keys, values)


def official_forward(sd, variant: str, family: str, depth: int, x, head_dim: Optional[int] = None):
    """Logits of the official network (layouts of tests/_official.py) for the official state dict `sd`, eval mode.

    `ref_model_features` is the whole-network reference on our modules.
    """
    imagenet = variant == 'imagenet'
    if imagenet:
        layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    else:
        layers = ((depth - 2) // 9,) * 3
    d = head_dim or (16 if not imagenet or family == 'mrla_base' else 32)
    if 'conv1.0.weight' in sd:
        x = F.relu(bn_state(F.conv2d(x, sd['conv1.0.weight'], stride=2, padding=1), sd, 'conv1.1.'))
        x = F.relu(bn_state(F.conv2d(x, sd['conv1.3.weight'], padding=1), sd, 'conv1.4.'))
        x = F.conv2d(x, sd['conv1.6.weight'], padding=1)
    elif imagenet:
        x = F.conv2d(x, sd['conv1.weight'], stride=2, padding=3)
    else:
        x = F.conv2d(x, sd['conv1.weight'], padding=1)
    x = F.relu(bn_state(x, sd, 'bn1.'))
    if imagenet:
        x = F.max_pool2d(x, 3, 2, 1)
    state = cache = None
    for si, nblocks in enumerate(layers):
        for i in range(nblocks):
            stride = 2 if si > 0 and i == 0 else 1
            trunk, cell = official_block_prefixes(variant, family, si, i)
            out = F.relu(bn_state(F.conv2d(x, sd[trunk + 'conv1.weight']), sd, trunk + 'bn1.'))
            out = F.conv2d(out, sd[trunk + 'conv2.weight'], stride=stride, padding=1)
            out = F.relu(bn_state(out, sd, trunk + 'bn2.'))
            out = bn_state(F.conv2d(out, sd[trunk + 'conv3.weight']), sd, trunk + 'bn3.')
            shortcut = x
            if trunk + 'downsample.0.weight' in sd:
                shortcut = F.conv2d(x, sd[trunk + 'downsample.0.weight'], stride=stride)
                shortcut = bn_state(shortcut, sd, trunk + 'downsample.1.')
            x = F.relu(out + shortcut)
            if family == 'kcla':
                x, state = official_kcla(x, state, sd, cell, init=kcla_init_cell(variant, i))
            elif family == 'mrla_light':
                x = official_mrla_light(x, shortcut, sd, cell, d)
            elif family == 'mrla_base':
                x, cache = official_mrla_base(x, cache, sd, cell, d, first=i == 0)
    return F.linear(x.mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


# ---------------------------------------------------------------------------------------------------------------
# CNNtention (docs/design/cnntention.md#cnn-modules), official parameter names under prefix `p`
# ---------------------------------------------------------------------------------------------------------------

def conv_state(x, sd, name):
    """1x1 (or any unpadded) conv with `sd[name + '.weight']` and the bias if present."""
    return F.conv2d(x, sd[name + '.weight'], sd.get(name + '.bias'))


def ref_selfatt(sd, p, x):
    """Official SelfAtt: energy = query^T key over positions, softmax over keys, no scaling, gamma residual."""
    B, C, H, W = x.shape
    q = conv_state(x, sd, p + 'query').view(B, C, -1).permute(0, 2, 1)
    k = conv_state(x, sd, p + 'key').view(B, C, -1)
    v = conv_state(x, sd, p + 'value').view(B, C, -1)
    attn = torch.softmax(torch.bmm(q, k), dim=-1)
    out = torch.bmm(v, attn.permute(0, 2, 1)).view(B, C, H, W)
    return sd[p + 'weights'] * out + x


def ref_mha(sd, p, x, heads=8):
    """Official MultiHeadAtt: energy = key^T query / sqrt(d), softmax over the last (query-conv) axis."""
    B, C, H, W = x.shape
    d = C // heads
    a = conv_state(x, sd, p + 'key').view(B, heads, d, -1)
    b = conv_state(x, sd, p + 'query').view(B, heads, d, -1)
    v = conv_state(x, sd, p + 'val').view(B, heads, d, -1)
    attn = torch.softmax(a.transpose(2, 3) @ b / math.sqrt(d), dim=-1)
    out = (v @ attn.transpose(2, 3)).reshape(B, C, H, W)
    return sd[p + 'weights'] * conv_state(out, sd, p + 'linear') + x


def ref_cbam(sd, p, x):
    """Official CBAM: channel attention (shared MLP on max- and mean-pooled features), then 7x7 spatial attention."""
    def mlp(z):
        return F.linear(F.relu(F.linear(z, sd[p + 'channel_attention.mlp.0.weight'])),
                        sd[p + 'channel_attention.mlp.2.weight'])
    f = x * torch.sigmoid(mlp(x.amax((2, 3))) + mlp(x.mean((2, 3))))[:, :, None, None]
    s = torch.cat([f.amax(1, keepdim=True), f.mean(1, keepdim=True)], 1)
    f = f * torch.sigmoid(F.conv2d(s, sd[p + 'spatial_attention.conv.weight'], sd[p + 'spatial_attention.conv.bias'],
                                   padding=3))
    return f + x


# ---------------------------------------------------------------------------------------------------------------
# GradAttn (docs/design/gradattn.md#ga-variants): the notebook's structure and parameter names
# ---------------------------------------------------------------------------------------------------------------

class RopeLayer(nn.Module):
    """The notebook's post-norm RoPE encoder layer, with its parameter names (written from
    docs/design/gradattn.md#ga-variants)."""

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
    """Token projections, encoder and classifier with the notebook's names (`projections.i.2`, ...): its
    `state_dict()` is an official-layout neck, its forward the reference (torch's own TransformerEncoder for
    No-PE / LPE, `RopeLayer` for RoPE)."""

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


# ---------------------------------------------------------------------------------------------------------------
# Attention shortcuts (docs/design/attention_shortcuts.md)
# ---------------------------------------------------------------------------------------------------------------

def explicit_depth_attention(q, k, v, num_heads):
    """Eq 3.2 one pixel and one head at a time: softmax over the n earlier entries, then the weighted sum.

    The definition, for small tensors; `depth_attention_einsum` is the same maths vectorised for whole networks.
    """
    B, n, C, H, W = k.shape
    d = C // num_heads
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for h in range(num_heads):
                    c = slice(h * d, (h + 1) * d)
                    scores = torch.stack([q[b, c, i, j] @ k[b, e, c, i, j] for e in range(n)]) / math.sqrt(d)
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    out[b, c, i, j] = sum(weights[e] * v[b, e, c, i, j] for e in range(n))
    return out


def depth_attention_einsum(q, k, v, num_heads=4):
    """`explicit_depth_attention` vectorised with einsum (per-pixel softmax over the n entries of `k` / `v`)."""
    B, n, C, H, W = k.shape
    h, d = num_heads, C // num_heads
    s = torch.einsum('bhdp,bnhdp->bnhp', q.reshape(B, h, d, -1), k.reshape(B, n, h, d, -1)) / math.sqrt(d)
    return torch.einsum('bnhp,bnhdp->bhdp', s.softmax(1), v.reshape(B, n, h, d, -1)).reshape(B, C, H, W)


def as_block_body(block, a):
    """H_l: the residual-free bottleneck ending in LayerNorm + ReLU (#as-bottleneck), from the block's layers."""
    a = F.relu(block.bn1(block.conv1(a)))
    a = F.relu(block.bn2(block.conv2(a)))
    return F.relu(block.ln3(block.conv3(a)))


def ref_block_sites(model, img):
    """#as-out pseudocode (AS_out; #as-kv: AS_KV with a group per width and adapters after strided blocks)."""
    blocks = [b for s in model.stages() for b in s]
    x = model.maxpool(model.forward_stem(img))
    group = model.as_proj[f'w{x.shape[1]}']
    K, V = group.k(x)[:, None], group.v(x)[:, None]
    for l, block in enumerate(blocks):
        group = model.as_proj[f'w{x.shape[1]}']
        a = group.o(V[:, 0]) if l == 0 else group.o(depth_attention_einsum(block.attn_in.q(x), K, V))
        x = as_block_body(block, a)
        if l == len(blocks) - 1:
            break
        if block.conv2.stride[0] == 2:  # the next site owns the conversion in the package's layout
            nxt = blocks[l + 1].attn_in
            if nxt.subsample:
                K, V = K[..., ::2, ::2], V[..., ::2, ::2]
            else:
                K = torch.stack([nxt.kv_adapt_k(K[:, e]) for e in range(K.shape[1])], 1)
                V = torch.stack([nxt.kv_adapt_v(V[:, e]) for e in range(V.shape[1])], 1)
        group = model.as_proj[f'w{x.shape[1]}']
        K, V = torch.cat([K, group.k(x)[:, None]], 1), torch.cat([V, group.v(x)[:, None]], 1)
    return model.forward_head(x)


def ref_stage_sites(model, img):
    """#as-stages: stage s+1 reads g_s(X_1..X_s) (pre-LN, own projections, adapters 256->512->1024)."""
    x = model.maxpool(model.forward_stem(img))
    K = V = None
    for stage in model.stages():
        site = getattr(stage, 'attn_in', None)
        if site is not None:
            y = site.norm(x)
            if K is not None:
                K = torch.stack([site.kv_adapt_k(K[:, e]) for e in range(K.shape[1])], 1)
                V = torch.stack([site.kv_adapt_v(V[:, e]) for e in range(V.shape[1])], 1)
                K, V = torch.cat([K, site.k(y)[:, None]], 1), torch.cat([V, site.v(y)[:, None]], 1)
                x = site.o(depth_attention_einsum(site.q(y), K, V))
            else:
                K, V = site.k(y)[:, None], site.v(y)[:, None]
                x = site.o(V[:, 0])
        for name, block in stage.named_children():
            if name.isdigit():
                x = block(x, [], [])[0]
    return model.forward_head(x)
