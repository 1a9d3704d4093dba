"""Reference for the DeiT layer-attention tests: the official DeiT-MRLA networks' forward, written independently of
the package from joyfang1106/MRLA `deit/deit_mrla_light.py` / `deit/deit_mrla_base.py` (a timm 0.3.2 ViT).

Everything reads an *official-layout* state dict (`blocks.i.mrla.normx`, `blocks.i.mrla.mrla.Wq`, ...) and uses
plain functional ops, in the official order: the square grid `int(sqrt(n - 1))` of 224 px inputs with one class
token, the class slot of the branch holding `LN(x)_cls`, MRLA-base's caches reset at blocks 0, 4, 8 (the Block's
`layer_index % 4` rule), per-head einsums and a `[B, t, C, h, w]` value cache like the official module.
`official_state_dict` generates such a state dict (random values, the official shapes and names).
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# DeiT sizes: embed dim, heads.
DEIT = dict(tiny=(192, 3), small=(384, 6), base=(768, 12))
DIM_MRLA = 16  # official `dim_mrla`
LN_EPS = 1e-6


def eca_k(c: int) -> int:
    t = int(abs((math.log(c, 2) + 1) / 2.))
    return t if t % 2 else t + 1


def official_state_dict(size: str, kind: str, depth: int = 12, img: int = 224, num_classes: int = 1000,
                        seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes of `ViT_mrlal` / `ViT_mrlab` (`kind`: 'light' / 'base').
    LayerNorm weights around 1 and running-free; values scaled so activations stay in a moderate range."""
    g = torch.Generator().manual_seed(seed)
    c, _ = DEIT[size]
    n = (img // 16) ** 2 + 1

    def r(*shape, std=0.02, mean=0.):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {'cls_token': r(1, 1, c), 'pos_embed': r(1, n, c), 'patch_embed.proj.weight': r(c, 3, 16, 16, std=0.05),
          'patch_embed.proj.bias': r(c)}
    k = eca_k(c)
    for i in range(depth):
        p = f'blocks.{i}.'
        sd.update({
            p + 'norm1.weight': r(c, std=0.1, mean=1.), p + 'norm1.bias': r(c),
            p + 'attn.qkv.weight': r(3 * c, c), p + 'attn.qkv.bias': r(3 * c),
            p + 'attn.proj.weight': r(c, c), p + 'attn.proj.bias': r(c),
            p + 'norm2.weight': r(c, std=0.1, mean=1.), p + 'norm2.bias': r(c),
            p + 'mlp.fc1.weight': r(4 * c, c), p + 'mlp.fc1.bias': r(4 * c),
            p + 'mlp.fc2.weight': r(c, 4 * c), p + 'mlp.fc2.bias': r(c),
            p + 'mrla.normx.weight': r(c, std=0.1, mean=1.), p + 'mrla.normx.bias': r(c, std=0.1),
            p + 'mrla.mrla.Wq.weight': r(1, 1, k, std=0.5), p + 'mrla.mrla.Wk.weight': r(1, 1, k, std=0.5),
            p + 'mrla.mrla.Wv.weight': r(c, 1, 3, 3, std=0.3),
        })
        if kind == 'light':
            sd[p + 'mrla.lambda_t'] = r(c, std=0.2)
            sd[p + 'mrla.normo.weight'] = r(c, std=0.1, mean=1.)
            sd[p + 'mrla.normo.bias'] = r(c, std=0.1)
    sd.update({'norm.weight': r(c, std=0.1, mean=1.), 'norm.bias': r(c), 'head.weight': r(num_classes, c),
               'head.bias': r(num_classes)})
    return sd


def _ln(x: torch.Tensor, sd: Dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + 'weight'], sd[prefix + 'bias'], LN_EPS)


def _attention(x: torch.Tensor, sd: Dict[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    qkv = F.linear(x, sd[p + 'qkv.weight'], sd[p + 'qkv.bias']).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + 'proj.weight'], sd[p + 'proj.bias'])


def _mlp(x: torch.Tensor, sd: Dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, sd[p + 'fc1.weight'], sd[p + 'fc1.bias'])), sd[p + 'fc2.weight'],
                    sd[p + 'fc2.bias'])


def _grid(tokens: torch.Tensor, prefix: int = 1, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The official reshape: `[b, n, c]` with one class token -> `[b, c, s, s]`, `s = int(sqrt(n - 1))`; or, for
    the generalisation, the tokens after `prefix` on the grid `hw` (row-major)."""
    b, n, c = tokens.shape
    if hw is None:
        s = int(math.sqrt(n - 1))
        hw = (s, s)
    return tokens[:, prefix:].reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)


def _qk(y: torch.Tensor, sd: Dict[str, torch.Tensor], p: str) -> Tuple[torch.Tensor, torch.Tensor]:
    pooled = F.adaptive_avg_pool2d(y, 1).squeeze(-1).transpose(-1, -2)  # [b, 1, c]
    wq, wk = sd[p + 'Wq.weight'], sd[p + 'Wk.weight']
    return F.conv1d(pooled, wq, padding=(wq.shape[-1] - 1) // 2), F.conv1d(pooled, wk, padding=(wk.shape[-1] - 1) // 2)


def mrla_light(x: torch.Tensor, o: torch.Tensor, sd: Dict[str, torch.Tensor], p: str, prefix: int = 1,
               hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The official `mrlal_module(x, o)`: the branch added to the block output `x` (its input is `o`). `prefix`
    / `hw`: the generalisation to other prefix counts and grids (the prefix slots hold `LN(x)_prefix`)."""
    xt, ot = _ln(x, sd, p + 'normx.'), _ln(o, sd, p + 'normo.')
    y = _grid(xt, prefix, hw)
    b, c, h, w = y.shape
    g = c // DIM_MRLA
    q, k = _qk(y, sd, p + 'mrla.')
    v = F.gelu(F.conv2d(y, sd[p + 'mrla.Wv.weight'], padding=1, groups=c)).view(b, g, c // g, h, w)
    att = torch.einsum('...id,...jd->...ij', q.view(b, g, 1, c // g), k.view(b, g, 1, c // g)) * (1 / math.sqrt(c / g))
    out = (v * torch.sigmoid(att.view(b, g, 1, 1, 1))).view(b, c, h, w)
    tokens = out.flatten(2).permute(0, 2, 1) + sd[p + 'lambda_t'] * ot[:, prefix:]
    return torch.cat([xt[:, :prefix], tokens], dim=1)


def mrla_base(x: torch.Tensor, sd: Dict[str, torch.Tensor], p: str, prev_k: Optional[torch.Tensor],
              prev_v: Optional[torch.Tensor], init_cell: bool, prefix: int = 1,
              hw: Optional[Tuple[int, int]] = None):
    """The official `mrlab_module(x, prev_k, prev_v)`: the branch, and the key cache `[b, t, c]` and value
    cache `[b, t, c, h, w]` it passes on (`prefix` / `hw` as for `mrla_light`)."""
    xt = _ln(x, sd, p + 'normx.')
    y = _grid(xt, prefix, hw)
    b, c, h, w = y.shape
    g = c // DIM_MRLA
    d = c // g
    q, k = _qk(y, sd, p + 'mrla.')
    v = F.conv2d(y, sd[p + 'mrla.Wv.weight'], padding=1, groups=c)
    keys = k if init_cell else torch.cat([prev_k, k], dim=1)
    values = v.unsqueeze(1) if init_cell else torch.cat([prev_v, v.unsqueeze(1)], dim=1)
    t = keys.shape[1]
    kh = keys.view(b, t, g, d).permute(0, 2, 1, 3)  # b g t d
    vh = values.view(b, t, g, d, h, w).permute(0, 2, 1, 3, 4, 5).reshape(b, g, t, d * h * w)
    att = (torch.einsum('...id,...jd->...ij', q.view(b, g, 1, d), kh) * (1 / math.sqrt(c / g))).softmax(dim=-1)
    out = torch.einsum('bgit,bgtj->bgij', att, vh).reshape(b, c, h, w)
    return torch.cat([xt[:, :prefix], out.flatten(2).permute(0, 2, 1)], dim=1), keys, values


def official_forward(sd: Dict[str, torch.Tensor], img: torch.Tensor, size: str, kind: str,
                     depth: int = 12) -> torch.Tensor:
    """Eval logits of the official `ViT_mrlal` (`kind='light'`) / `ViT_mrlab` (`'base'`) for `sd`."""
    c, heads = DEIT[size]
    x = F.conv2d(img, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd['cls_token'].expand(x.shape[0], -1, -1), x], dim=1) + sd['pos_embed']
    prev_k = prev_v = None
    for i in range(depth):
        p = f'blocks.{i}.'
        o = x
        x = x + _attention(_ln(x, sd, p + 'norm1.'), sd, p + 'attn.', heads)
        x = x + _mlp(_ln(x, sd, p + 'norm2.'), sd, p + 'mlp.')
        if kind == 'light':
            x = x + mrla_light(x, o, sd, p + 'mrla.')
        else:
            branch, prev_k, prev_v = mrla_base(x, sd, p + 'mrla.', prev_k, prev_v, init_cell=i % 4 == 0)
            x = x + branch
    x = _ln(x, sd, 'norm.')
    return F.linear(x[:, 0], sd['head.weight'], sd['head.bias'])
