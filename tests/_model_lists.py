"""The model lists of the contract tests, derived from the registry: a new family or variant is covered
without editing a test.

* `ALL_MODELS`: every registered name (`timm_layerattn.models.list_models()`), for the cheap checks.
* `REPRESENTATIVES`: the cheapest variant of each family (`cost`, estimated on the meta device).
* `CODE_PATHS`: the cheapest variant of each distinct module structure within a family. Variants that differ
  only in widths, depths or stems share a structure; a different strategy, block, residual mode or positional
  embedding does not (`structure`).
* `LAYER_ATTN`: every model with a per-block layer-attention module (`LayerAttnBase`: KCLA, MRLA), the models
  with fused kernels and a memory-lean training path.
* `MODELS` = `CODE_PATHS`: the models of the expensive checks (forward, backward, every parameter gets a gradient,
  grad checkpointing, intermediates, pruning, fx training, channels_last). A variant that differs from a
  checked one only in widths or depths runs no other code; every name still gets the per-name contract
  (TorchScript, fx, compile, export, features) and timm's own test_models.py.
* `HEAVY`: the deepest models (100 and more weight layers) whose module structure a shallower variant of their
  family shares, marked `heavy` where every name runs: deselected by default (`-m heavy` runs them), as the
  shallower variant's per-name checks run the same code. A deep model with a structure of its own (KCLA's
  re-summary of a long stage, only in `resnet101_kcla`) stays in the default run.
"""
import functools
import itertools
import re
from typing import Dict, FrozenSet, List, Tuple

import timm
import torch.nn as nn
from timm.models import model_entrypoint

import timm_layerattn
from timm_layerattn.families import families
from timm_layerattn.layers import LayerAttnBase

PACKAGE = timm_layerattn.__name__
ALL_MODELS: List[str] = timm_layerattn.models.list_models()

# (class, own parameter / buffer names, children as (name, class or '')) of each module that counts
Structure = FrozenSet[Tuple[str, Tuple[str, ...], Tuple[Tuple[str, str], ...]]]


def timm_models_of_this_package() -> List[str]:
    """Every model timm knows whose entrypoint is in this package, whether or not a family lists it."""
    return [n for n in timm.list_models() if model_entrypoint(n).__module__.split('.')[0] == PACKAGE]


@functools.lru_cache(maxsize=None)
def _meta_model(name: str) -> nn.Module:
    return timm.create_model(name, device='meta')


def input_size(cfg) -> int:
    """Side of the contract tests' inputs: CIFAR nets at 32 px, ImageNet nets at 64 px."""
    return 32 if cfg['input_size'][-1] <= 32 else 64


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cost(name: str) -> float:
    """Multiply-accumulates at the contract tests' input size, estimated without running the model: each
    feature level's weights times its output positions (a conv's count), the rest of the weights once. Exact
    enough to rank variants that differ in widths, depths or stems; a CIFAR ResNet-50 at 32 px costs about four
    times its ImageNet twin at 64 px, though it has fewer parameters."""
    model = _meta_model(name)
    size = input_size(model.pretrained_cfg)
    total, in_levels = 0., 0
    for info in model.feature_info:
        n = _n_params(model.get_submodule(info['module']))
        total += n * (size / info['reduction']) ** 2
        in_levels += n
    return total + _n_params(model) - in_levels


def weight_layers(name: str) -> int:
    """Convolutions and linear layers: the depth that sets a small input's run time (per-layer overhead)."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in _meta_model(name).modules())


def _ours(module: nn.Module) -> bool:
    return type(module).__module__.split('.')[0] == PACKAGE


def _owns_tensors(module: nn.Module) -> bool:
    return next(itertools.chain(module.parameters(), module.buffers()), None) is not None


def _unnumbered(name: str) -> str:
    return re.sub(r'\d+', '#', name)


def structure(name: str) -> Structure:
    """The model's module structure: for every module that owns tensors or whose class is this package's, its
    class, own parameter / buffer names and, for this package's modules, the children it holds (by name, with
    the class of those that hold tensors or are this package's). Numbers in names are dropped, so widths,
    depths and repeated blocks do not change it; stateless torch / timm modules (pooling, activations,
    identities) are not told apart, so stems that differ only in a max-pool share one."""
    out = set()
    for module in _meta_model(name).modules():
        own = tuple(sorted(_unnumbered(n) for n, _ in itertools.chain(
            module.named_parameters(recurse=False), module.named_buffers(recurse=False))))
        if not (own or _ours(module)):
            continue
        children = tuple(sorted({
            (_unnumbered(n), type(c).__qualname__ if _owns_tensors(c) or _ours(c) else '')
            for n, c in module.named_children()})) if _ours(module) else ()
        out.add((f'{type(module).__module__}.{type(module).__qualname__}', own, children))
    return frozenset(out)


def _cheapest(names: List[str]) -> str:
    return min(names, key=lambda n: (cost(n), n))


def _by_family() -> Dict[str, List[str]]:
    """Each family's registered variants, in registry order."""
    return {f.name: [n for n in ALL_MODELS if n in f.models] for f in families()}


def representatives() -> List[str]:
    """The cheapest registered variant of each family (a family without one is left out: see
    `test_timm_contract.py::test_registry_families_cover_every_model`)."""
    return sorted({_cheapest(names) for names in _by_family().values() if names}, key=ALL_MODELS.index)


def code_paths() -> List[str]:
    """The cheapest variant of each distinct module structure within each family."""
    chosen = set()
    for names in _by_family().values():
        groups: Dict[Structure, List[str]] = {}
        for n in names:
            groups.setdefault(structure(n), []).append(n)
        chosen.update(_cheapest(g) for g in groups.values())
    return sorted(chosen, key=ALL_MODELS.index)


def layer_attn_models() -> List[str]:
    return [n for n in ALL_MODELS if any(isinstance(m, LayerAttnBase) for m in _meta_model(n).modules())]


REPRESENTATIVES = representatives()
CODE_PATHS = code_paths()
LAYER_ATTN = layer_attn_models()
MODELS = CODE_PATHS


def heavy_models() -> List[str]:
    """100 and more weight layers (ResNet-101, CIFAR ResNet-110 variants) and a shallower variant of the same
    family with the same structure."""
    deep = [n for n in ALL_MODELS if weight_layers(n) >= 100]
    by_family = _by_family()
    shallow = {f: {structure(n) for n in names if n not in deep} for f, names in by_family.items()}
    family = {n: f for f, names in by_family.items() for n in names}
    return [n for n in deep if structure(n) in shallow[family[n]]]


HEAVY = heavy_models()
_meta_model.cache_clear()  # the lists are all that is kept
