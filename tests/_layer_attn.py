"""Shared helpers of the layer-attention (KCLA / MRLA) tests: tests/test_kcla.py, tests/test_mrla.py,
tests/test_layer_math.py, tests/test_native_kernels.py and tests/test_convert.py.

The `check_*` functions are the bodies of tests that are parametrised over families and split by family across
those files (each file keeps its own parameter list).
"""
from typing import List, Tuple

import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official
from timm_layerattn.layers import KCLA, LayerAttnBase, MRLABase, MRLALight, native
from timm_layerattn.models.resnet_la import checkpoint_filter_fn

from _official import kcla_norm_d, materialize, numel, official_from_model, official_shapes
from _reference import official_forward, ref_model_features


def graph_nodes(out: torch.Tensor) -> List[object]:
    """Every autograd node reachable from `out` (the lean / fused Functions' nodes are found by class name)."""
    seen, todo, nodes = set(), [out.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return nodes


# ---------------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------------


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial BN statistics and affines so every parameter shapes the output (incl. zero-init bn3)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.2
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def trained_like(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A model whose every tensor (BN statistics included) differs from its init, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point() and not k.endswith('norm_d'):
                v.add_(torch.rand_like(v) * 0.1 if k.endswith('running_var') else torch.randn_like(v) * 0.05)
    return model.eval()


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """Max error relative to the tensor's scale: deep random nets reach large activations, where
    float32 summation-order differences exceed elementwise tolerances near zero crossings."""
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f'max abs error {err:.3g} > {tol:g} x scale {scale:.3g}'


def n_params(name: str, **kwargs) -> int:
    model = timm.create_model(name, device='meta', **kwargs)
    return sum(p.numel() for p in model.parameters())


CHAINS = ['kcla', 'mrla_base', 'mrla_light']


def layer_attn_chain(kind: str) -> List[Tuple[LayerAttnBase, torch.Tensor, torch.Tensor]]:
    """Eval-mode modules of one strategy with their inputs `(module, x, shortcut)`, covering every state case:
    KCLA first block, same stage, width change with re-summary and mid-stage re-summary; MRLA-B first block,
    growing cache and a new stage. Drop path is set (identity in eval)."""
    torch.manual_seed(0)
    d = 8
    if kind == 'kcla':
        mods = [
            KCLA(32, head_dim=d, drop_path=0.1),
            KCLA(32, head_dim=d, drop_path=0.1),
            KCLA(64, head_dim=d, in_channels=32, rebuild=True, history_stride=2, drop_path=0.1),
            KCLA(64, head_dim=d, drop_path=0.1),
            KCLA(64, head_dim=d, rebuild=True, drop_path=0.1),
        ]
        shapes = [(3, 32, 9, 7)] * 2 + [(3, 64, 5, 4)] * 3
    elif kind == 'mrla_base':
        mods = [MRLABase(32, head_dim=d, first_in_stage=first, drop_path=0.1)
                for first in (True, False, False, True, False)]
        shapes = [(2, 32, 5, 6)] * len(mods)
    else:
        mods = [MRLALight(64, head_dim=16, drop_path=0.1) for _ in range(2)]
        shapes = [(2, 64, 6, 5)] * len(mods)
    for m in mods:
        randomize_norms(m).eval()
        torch.nn.init.normal_(m.v.weight, std=0.3)
    return [(m, torch.randn(s).relu(), torch.randn(s)) for m, s in zip(mods, shapes)]


# ---------------------------------------------------------------------------------------------------------------
# Paths of one module (reference / folded / native)
# ---------------------------------------------------------------------------------------------------------------


def run_path(
        mod: LayerAttnBase,
        path: str,
        x: torch.Tensor,
        shortcut: torch.Tensor,
        state: List[torch.Tensor],
        grad: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One path (`reference`, `folded`, `native`) of `mod` on copies of the inputs (paths may work in place)."""
    with torch.set_grad_enabled(grad):
        out, new_state = getattr(mod, f'forward_{path}')(x.clone(), shortcut.clone(), [t.clone() for t in state])
    return out.detach(), [t.detach() for t in new_state]


def assert_same_step(a: Tuple[torch.Tensor, List[torch.Tensor]], b: Tuple[torch.Tensor, List[torch.Tensor]]):
    """Equal block outputs and carried states."""
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert len(a[1]) == len(b[1])
    for s, r in zip(a[1], b[1]):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)


def record_paths(mod: LayerAttnBase) -> List[str]:
    """Patch `mod`'s path methods to log which one each call takes."""
    taken = []
    for path in ('reference', 'folded', 'native'):
        def wrapped(*args, _path=path, _fn=getattr(mod, f'forward_{path}')):
            taken.append(_path)
            return _fn(*args)
        setattr(mod, f'forward_{path}', wrapped)
    return taken


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU kernels
# ---------------------------------------------------------------------------------------------------------------


# (H, W) of a first stage; the next stage is half that (rounded up), as after a stride-2 block
SIZES = [(9, 7), (1, 1), (1, 6), (6, 1), (14, 14)]


def kernel_calls(fn) -> int:
    """How many of the package's native ops `fn()` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith('timm_layerattn::'))


def half(hw):
    return tuple((s + 1) // 2 for s in hw)


# ---------------------------------------------------------------------------------------------------------------
# Family-split test bodies
# ---------------------------------------------------------------------------------------------------------------


def check_reference_network(name, size, training):
    """`name`'s features against `ref_model_features` of tests/_reference.py. Whole-network wiring: stem, strides,
    where history is re-summarised, cache resets per stage.

    float64, so that batch-statistics BN over tiny late-stage maps does not amplify rounding noise.
    """
    model = randomize_norms(timm.create_model(name, drop_path_rate=0.)).double().train(training)
    x = torch.randn(2, 3, size, size + 3, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_features(x)
        ref = ref_model_features(model, x, training)
    assert_close_scaled(out, ref, tol=1e-10)


def check_kernels_match_pytorch(name, size):
    """Whole networks (every block, stage changes, KCLA re-summaries, MRLA-B caches) give the same logits
    and features with and without the kernels, and every attention block runs its kernel."""
    model = randomize_norms(timm.create_model(name, num_classes=7)).eval()
    x = torch.randn(2, 3, size, size + 5)
    with torch.inference_mode():
        with native.disabled():
            ref = model(x)
            ref_feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
        calls = kernel_calls(lambda: model(x))
    # float32 rounding differs (summation order) and grows with depth in these random-weight nets
    assert_close_scaled(out, ref, tol=1e-4)
    for f, r in zip(feats, ref_feats):
        assert_close_scaled(f, r, tol=1e-4)
    assert calls == sum(1 for m in model.modules() if isinstance(m, LayerAttnBase))
    with torch.no_grad():  # no_grad takes the same path as inference_mode
        assert_close_scaled(model(x), ref, tol=1e-4)


def check_official_parity(model_name: str, variant: str, family: str, depth: int, size: int,
                          head_dim=None, model_head_dim=None):
    """Official tensors (tests/_official.py), converted and loaded strictly, against `official_forward` of
    tests/_reference.py on the official tensors."""
    official = materialize(official_shapes(variant, family, depth, head_dim=head_dim))
    converted = convert_official({'state_dict': {'module.' + k: v for k, v in official.items()}, 'epoch': 90},
                                 model_name, head_dim=model_head_dim)
    kwargs = {'head_dim': model_head_dim} if model_head_dim else {}
    model = timm.create_model(model_name, **kwargs).eval()
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(official, variant, family, depth, x, head_dim=head_dim)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def check_imagenet_layout_counts(family, depth, head_dim, entries, total):
    """The ImageNet layout of tests/_official.py has the measured parameter total (and state_dict size)."""
    shapes = official_shapes('imagenet', family, depth, head_dim=head_dim)
    assert numel(shapes) == total
    if entries is not None:
        assert len(shapes) == entries


def check_strict_conversion(model_name, family, depth):
    """Every remaining official architecture converts and fits the model exactly (checked on the meta device)."""
    variant = 'cifar' if model_name.startswith('cifar') else 'imagenet'
    shapes = official_shapes(variant, family, depth)
    official = {k: torch.empty(v, device='meta') for k, v in shapes.items()}
    if family == 'kcla':
        official.update({k: kcla_norm_d(v[1]).view(v) for k, v in shapes.items() if k.endswith('norm_d')})
    converted = convert_official(official, model_name)
    expected = timm.create_model(model_name, device='meta').state_dict()
    assert list(converted) == list(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


FAMILY = {'kcla': 'kcla', 'mrlal': 'mrla_light', 'mrlab': 'mrla_base'}  # short name -> official family


def check_official_r50_loads(name, variant, entries):
    """An official ResNet-50 training checkpoint carrying `name`'s values converts, loads strictly and gives the
    same outputs."""
    kwargs = dict(head_dim=64) if variant == 'kcla' else {}  # the released KCLA code's default
    model = timm.create_model(name, **kwargs).eval()
    official = official_from_model(model, 'imagenet', FAMILY[variant], 50, **kwargs)
    assert len(official) == entries  # state_dict sizes measured with the official code (the *-official-keys sections)
    wrapped = {'epoch': 99, 'state_dict': {'module.' + k: v for k, v in official.items()}, 'best_acc1': 77.0}
    converted = checkpoint_filter_fn(wrapped, model)
    fresh = timm.create_model(name, **kwargs).eval()
    fresh.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
