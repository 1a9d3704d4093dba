"""Attention shortcuts: the skip combiner of a ResNet as multi-head attention over all earlier outputs.

Paper: `Introducing attention shortcuts in convolutional neural networks` (D. Erroz, M. Galar, AIMS 2025).
Design notes: docs/design/attention_shortcuts.md; the `#as-...` anchors cited below are sections of that page.

Block `l` of the network computes `X_l = H_l(g_l(X_1, ..., X_{l-1}))`, where the site `g_l` is attention
along the *depth* axis, independently at every pixel p (#as-depth-attention, Eq 3.2):

    q      = W^Q X_{l-1}[p]                    one query per pixel, from the newest output
    K_j    = W^K X_j[p],  V_j = W^V X_j[p]      one key / value per earlier output, j = 1 .. l-1
    g_l[p] = W^O concat_k softmax_j(q_k . K_jk / sqrt(c/h)) V_jk        (h heads of c/h channels)

Keys and values are projected once, when their output is produced, and kept in a cache (#as-cache-kv). The cache
is a pair of tensors `[K, V]` of shape `[B, n, C, H, W]` that grows along dim 1 (tensors, not Python
lists, so that `torch.fx` can trace the cache adapters). When the width or resolution changes between two
sites the cache is brought to the new shape: subsampled with a 1x1 window and stride 2 (AS_out,
#as-cache-subsample), or passed through 1x1 convs with the stride (AS_KV / AS_stages, #as-cache-adapters).

Each site appends the newest output's K/V itself, just before attending (a site sees exactly the outputs
that precede it), so the output of the network's last block is never projected, and a network pruned for
feature extraction projects nothing it does not use.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from ._checks import check_bool, check_choice, check_float, check_int

__all__ = [
    'ShortcutCfg', 'ShortcutProj', 'ShortcutProjections', 'ShortcutWeights', 'AttentionShortcut',
    'create_shortcut_site', 'depth_attention', 'depth_attention_sdpa',
]

_DOWNSAMPLE = ('subsample', 'conv')
_SHARING = ('per_site', 'shared')
_ADAPTER = ('separate', 'shared')


@dataclass(frozen=True)
class ShortcutCfg:
    """Attention-shortcut strategy of a ResNet (docs/design/attention_shortcuts.md#as-package).

    Attributes:
        placement: 'block': a site in front of every block, K/V/O projections shared by all sites of one
            width and owned once by the network (AS_out, AS_KV); 'stage': a site between stages, each with
            its own projections (AS_stages).
        num_heads: Attention heads h (#as-heads).
        downsample: How the cache follows a stride: 'subsample' (parameter-free, widths must not change;
            AS_out) or 'conv' (1x1 convs with the stride, mapping the old width to the new; AS_KV, AS_stages).
        q_proj: 'per_site' (default) or 'shared' (one W^Q per width, in the shared group; 'block' only;
            #as-projection-sharing).
        kv_adapter: 'separate' K and V adapters (default) or one 'shared' adapter for both (#as-cache-adapters).
        pre_norm: LayerNorm2d on each site's input (AS_stages, whose stage outputs are not normalised;
            #as-stages-design).
        norm_eps: LayerNorm epsilon (the PyTorch default; the paper gives none).
    """
    placement: str = 'block'
    num_heads: int = 4
    downsample: str = 'subsample'
    q_proj: str = 'per_site'
    kv_adapter: str = 'separate'
    pre_norm: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        owner = 'ShortcutCfg'
        checks = (
            ('placement', self.placement, ('block', 'stage')), ('downsample', self.downsample, _DOWNSAMPLE),
            ('q_proj', self.q_proj, _SHARING), ('kv_adapter', self.kv_adapter, _ADAPTER))
        for name, value, allowed in checks:
            check_choice(owner, name, value, allowed)
        if self.placement == 'stage' and self.q_proj != 'per_site':
            raise ValueError("ShortcutCfg: q_proj='shared' needs placement='block' (stage sites share nothing)")
        check_int(owner, 'num_heads', self.num_heads)
        check_bool(owner, 'pre_norm', self.pre_norm)
        check_float(owner, 'norm_eps', self.norm_eps, low_inclusive=False)


def depth_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head attention of every pixel's query over the `n` cached entries at the same pixel.

    Args:
        q: Queries `[B, C, H, W]`.
        k: Cached keys `[B, n, C, H, W]`.
        v: Cached values `[B, n, C, H, W]`.
        num_heads: Heads h; each head uses `C / h` channels and the scale `(C / h) ** -0.5`.

    Returns:
        `[B, C, H, W]`, the concatenated heads (before W^O).

    The softmax runs over n <= depth entries per pixel and head. As one batched broadcast-multiply-reduce
    over the cache layout this is 10-100x faster on CPU than `scaled_dot_product_attention` on the
    equivalent `[B*H*W, h, 1 | n, d]` reshape (`depth_attention_sdpa`), which pays per-pixel overhead for
    query length 1, and autograd keeps only the cache itself (the products are not saved).
    """
    B, n, C, H, W = k.shape
    d = C // num_heads
    q = q.reshape(B, 1, num_heads, d, H * W)
    scores = (q * k.reshape(B, n, num_heads, d, H * W)).sum(3) * d ** -0.5  # [B, n, h, HW]
    attn = scores.softmax(dim=1)
    out = (attn.unsqueeze(3) * v.reshape(B, n, num_heads, d, H * W)).sum(1)  # [B, h, d, HW]
    return out.reshape(B, C, H, W)


def depth_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`depth_attention` as `F.scaled_dot_product_attention` with batch B*H*W, query length 1, key length n.

    The recommended formulation (#as-mechanism); numerically the same as `depth_attention`, faster on some
    accelerators, slower on CPU.
    """
    B, n, C, H, W = k.shape
    d = C // num_heads
    q = q.reshape(B, num_heads, d, H * W).permute(0, 3, 1, 2).unsqueeze(3)  # [B, HW, h, 1, d]
    k = k.reshape(B, n, num_heads, d, H * W).permute(0, 4, 2, 1, 3)  # [B, HW, h, n, d]
    v = v.reshape(B, n, num_heads, d, H * W).permute(0, 4, 2, 1, 3)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, h, 1, d]
    return out.squeeze(3).permute(0, 2, 3, 1).reshape(B, C, H, W)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None) -> nn.Conv2d:
    # Projections and adapters are bias-free 1x1 convs (#as-bias-free).
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, device=device, dtype=dtype)


# The weights `(W^Q or None, W^K or None, W^V, W^O)` of one width's shared projections, as a site receives
# them: tensors, not the module, because TorchScript has no module-typed arguments.
ShortcutWeights = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]


class ShortcutProj(nn.Module):
    """W^K, W^V, W^O (and W^Q with `q_proj='shared'`) of one width, shared by every site of that width."""

    def __init__(self, dim: int, query: bool = False, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.dim = dim
        self.q = _conv1x1(dim, dim, **dd) if query else None
        self.k = _conv1x1(dim, dim, **dd)
        self.v = _conv1x1(dim, dim, **dd)
        self.o = _conv1x1(dim, dim, **dd)

    def weights(self) -> ShortcutWeights:
        """The group's weights for `AttentionShortcut.forward_weights` (absent projections as `None`)."""
        q: Optional[torch.Tensor] = None
        k: Optional[torch.Tensor] = None
        if self.q is not None:
            q = self.q.weight
        if self.k is not None:
            k = self.k.weight
        return q, k, self.v.weight, self.o.weight


class ShortcutProjections(nn.ModuleDict):
    """The network-level part of block-placed attention shortcuts: one `ShortcutProj` per site width.

    Owned once by the network (`as_proj.w{C}.{k,v,o}`), handed to each block's site at call time, so the
    shared tensors appear once in the state dict (safetensors refuses aliased tensors).
    """

    def __init__(self, dims: Iterable[int], query_dims: Iterable[int] = (), device=None, dtype=None):
        query_dims = set(query_dims)
        super().__init__({f'w{c}': ShortcutProj(c, query=c in query_dims, device=device, dtype=dtype)
                          for c in sorted(set(dims))})

    def weights(self) -> Dict[int, ShortcutWeights]:
        """Every group's weights by width (see `ShortcutWeights`)."""
        out: Dict[int, ShortcutWeights] = {}
        for proj in self.values():
            out[proj.dim] = proj.weights()
        return out

    def shared_tensors(self) -> List[torch.Tensor]:
        """All groups' weights as one flat list, in the order `bind` indexes: what the network hands to
        every unit (a site finds its group's weights at its `slots`)."""
        out: List[torch.Tensor] = []
        for proj in self.values():
            q, k, v, o = proj.weights()
            if q is not None:
                out.append(q)
            if k is not None:
                out.append(k)
            out.append(v)
            out.append(o)
        return out

    def bind(self, sites: Iterable['AttentionShortcut']) -> None:
        """Tell each site where its group's weights are in `shared_tensors()` (again after pruning)."""
        index: Dict[int, Tuple[int, int, int, int]] = {}
        i = 0
        for proj in self.values():
            q, k, _, _ = proj.weights()
            iq = i if q is not None else -1
            i += q is not None
            ik = i if k is not None else -1
            i += k is not None
            index[proj.dim] = (iq, ik, i, i + 1)
            i += 2
        for site in sites:
            site.slots = index[site.dim]

    def prune(self, sites: Iterable['AttentionShortcut']) -> None:
        """Keep only what the given (remaining) sites use, and rebind them: every parameter must receive a
        gradient (DDP)."""
        sites = list(sites)
        used = {s.dim for s in sites}
        queried = {s.dim for s in sites if s.has_query}
        for key in list(self.keys()):
            dim = int(key[1:])
            if dim not in used:
                del self[key]
                continue
            if dim not in queried:
                self[key].q = None
            if len(sites) == 1:
                self[key].k = None  # a lone first site reads no keys
        self.bind(sites)


class AttentionShortcut(nn.Module):
    """One attention-shortcut site g: cache update, then per-pixel attention of the newest output over it.

    A site's parts that are its own: its query projection W^Q (absent at the network's first site, where the
    softmax over one entry is identically 1 and g reduces to W^O V_1; #as-site-placement), the cache adapters
    when the cache changes width here (#as-cache-adapters), the optional pre-norm (#as-stages-design) and, for
    stage sites, its K/V/O projections. The K/V/O of block sites are shared per width and passed to
    `forward_weights` by the network.

    State: `[]` before the first site, then `[K, V]`, each `[B, n, C, H, W]` at this site's width and
    resolution after the site ran.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 4,
            cache_dim: Optional[int] = None,
            cache_stride: int = 1,
            downsample: str = 'subsample',
            kv_adapter: str = 'separate',
            query: bool = True,
            own_proj: bool = False,
            pre_norm: bool = False,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Width C of the site's input (the newest output) and of its cache.
            num_heads: Heads h; `dim` must be divisible by it.
            cache_dim: Width of the incoming cache, `None` at the network's first site (empty cache).
            cache_stride: Spatial stride between the incoming cache and the site's input.
            downsample: 'subsample' or 'conv' (see `ShortcutCfg`).
            kv_adapter: 'separate' or 'shared' (for 'conv' downsampling).
            query: Own a per-site W^Q (False with `q_proj='shared'`, whose W^Q lives in the shared group).
            own_proj: Own W^K / W^V / W^O (stage sites) instead of receiving a shared group.
            pre_norm: LayerNorm2d on the input before it is projected.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        owner = 'AttentionShortcut'
        check_int(owner, 'dim', dim)
        check_int(owner, 'num_heads', num_heads)
        check_int(owner, 'cache_stride', cache_stride)
        if cache_dim is not None:
            check_int(owner, 'cache_dim', cache_dim)
        check_choice(owner, 'downsample', downsample, _DOWNSAMPLE)
        check_choice(owner, 'kv_adapter', kv_adapter, _ADAPTER)
        if dim % num_heads:
            raise ValueError(f'AttentionShortcut: width {dim} is not divisible by num_heads={num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.first = cache_dim is None
        self.has_query = not self.first  # the first site's softmax is over a single entry
        self.cache_stride = 1 if self.first else cache_stride
        self.subsample = False
        self.norm = LayerNorm2d(dim, eps=norm_eps, **dd) if pre_norm else None
        self.q = _conv1x1(dim, dim, **dd) if self.has_query and query else None
        self.k = _conv1x1(dim, dim, **dd) if own_proj else None
        self.v = _conv1x1(dim, dim, **dd) if own_proj else None
        self.o = _conv1x1(dim, dim, **dd) if own_proj else None
        self.kv_adapt_k: Optional[nn.Module] = None
        self.kv_adapt_v: Optional[nn.Module] = None
        self.kv_adapt: Optional[nn.Module] = None
        # Where the shared group's (W^Q, W^K, W^V, W^O) are in the network's shared tensors (-1: absent);
        # set by `ShortcutProjections.bind` for sites without projections of their own.
        self.slots: Tuple[int, int, int, int] = (-1, -1, -1, -1)
        if not self.first and (cache_dim != dim or cache_stride != 1):
            if downsample == 'subsample':
                if cache_dim != dim:
                    raise ValueError(
                        f"AttentionShortcut: downsample='subsample' keeps the width, but the cache is {cache_dim} "
                        f"wide and this site {dim}; use downsample='conv'")
                self.subsample = True
            elif kv_adapter == 'shared':
                self.kv_adapt = _conv1x1(cache_dim, dim, stride=cache_stride, **dd)
            else:
                self.kv_adapt_k = _conv1x1(cache_dim, dim, stride=cache_stride, **dd)
                self.kv_adapt_v = _conv1x1(cache_dim, dim, stride=cache_stride, **dd)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, first={self.first}, cache_stride={self.cache_stride}'

    def update_cache(self, state: List[torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> List[torch.Tensor]:
        """Bring the incoming cache to this site's shape, then append the newest output's `k`, `v`."""
        k, v = k.unsqueeze(1), v.unsqueeze(1)
        if len(state) == 0:
            return [k, v]
        cache_k, cache_v = state[0], state[1]
        if self.subsample:
            s = self.cache_stride
            cache_k, cache_v = cache_k[..., ::s, ::s], cache_v[..., ::s, ::s]
        # One conv serves every cached entry: fold the entries into the batch. Both sizes are given when
        # unfolding, as `-1` is ambiguous for an empty batch.
        entries = [cache_k.shape[0], cache_k.shape[1]]
        if self.kv_adapt is not None:
            cache_k = self.kv_adapt(cache_k.flatten(0, 1)).unflatten(0, entries)
            cache_v = self.kv_adapt(cache_v.flatten(0, 1)).unflatten(0, entries)
        if self.kv_adapt_k is not None and self.kv_adapt_v is not None:
            cache_k = self.kv_adapt_k(cache_k.flatten(0, 1)).unflatten(0, entries)
            cache_v = self.kv_adapt_v(cache_v.flatten(0, 1)).unflatten(0, entries)
        return [torch.cat([cache_k, k], dim=1), torch.cat([cache_v, v], dim=1)]

    def attend(self, q: Optional[torch.Tensor], cache: List[torch.Tensor]) -> torch.Tensor:
        """Heads concatenated, before W^O. `q` is None only at the first site (one entry: its value)."""
        if q is None:
            return cache[1][:, 0]
        return depth_attention(q, cache[0], cache[1], self.num_heads)

    def forward(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
            shared: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The site with its own K/V/O (stage sites) or its group's, found in the network's `shared` tensors
        at `slots` (block sites)."""
        return self.forward_weights(x, state, self._weights(shared))

    def _weights(self, shared: List[torch.Tensor]) -> ShortcutWeights:
        wk: Optional[torch.Tensor] = None
        if self.v is not None and self.o is not None:
            if self.k is not None:
                wk = self.k.weight
            return None, wk, self.v.weight, self.o.weight
        iq, ik, iv, io = self.slots
        assert iv >= 0, 'site has no projections of its own and is not bound to a shared group'
        wq: Optional[torch.Tensor] = None
        if iq >= 0:
            wq = shared[iq]
        if ik >= 0:
            wk = shared[ik]
        return wq, wk, shared[iv], shared[io]

    def forward_weights(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
            proj: ShortcutWeights,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The site's maths on explicit K/V/O (and shared W^Q) weights, `proj` (`ShortcutProj.weights()`):
        the projections are bias-free 1x1 convs, so `F.conv2d` on their weights is the same op as calling
        them. A per-site W^Q is the site's own `q`."""
        wq, wk, wv, wo = proj
        if self.norm is not None:
            x = self.norm(x)
        v = F.conv2d(x, wv)
        if wk is None:
            return F.conv2d(v, wo), state  # the only site of a pruned network (see `ShortcutProjections.prune`)
        cache = self.update_cache(state, F.conv2d(x, wk), v)
        q: Optional[torch.Tensor] = None
        if self.has_query:
            if self.q is not None:
                q = self.q(x)
            else:
                assert wq is not None, 'site has no query projection'
                q = F.conv2d(x, wq)
        return F.conv2d(self.attend(q, cache), wo), cache

    def drop_key(self) -> None:
        """Remove W^K of a first site that no later site follows: its keys are only ever read by later sites,
        and an unused parameter breaks DDP. Only for pruned networks."""
        if not self.first:
            raise RuntimeError('only the first site can do without keys')
        self.k = None


def create_shortcut_site(
        cfg: ShortcutCfg,
        dim: int,
        cache_dim: Optional[int],
        cache_stride: int,
        device=None,
        dtype=None,
) -> AttentionShortcut:
    """Build the site in front of a block (`cfg.placement='block'`) or of a stage ('stage').

    Args:
        cfg: Strategy.
        dim: Width of the site's input.
        cache_dim: Width of the previous site's input (the cache's width), `None` for the first site.
        cache_stride: Stride of the block or stage between the previous site and this one.
    """
    stage = cfg.placement == 'stage'
    return AttentionShortcut(
        dim, num_heads=cfg.num_heads, cache_dim=cache_dim, cache_stride=cache_stride, downsample=cfg.downsample,
        kv_adapter=cfg.kv_adapter, query=cfg.q_proj == 'per_site', own_proj=stage, pre_norm=cfg.pre_norm,
        norm_eps=cfg.norm_eps, device=device, dtype=dtype)
