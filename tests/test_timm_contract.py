"""The timm model contract for every model this package registers.

Mirrors timm 1.0.31's tests/test_models.py checks (which `tests/test_timm_models.py` runs as they are) and adds
the ones timm only runs for its own modules (forward_intermediates, pruning, getter features). CIFAR nets run at
32 px, ImageNet nets at 64 px. Every model list comes from the registry (`_model_lists`), so a new family or
variant is covered without editing this file:

* every registered name (`ALL_MODELS`): the config / API contract and a forward on the meta device, and
  TorchScript, fx, `torch.compile(fullgraph=True)`, `torch.export` and features against eager (each model's
  checks in one xdist group, so that they share one built model and its eager output);
* `MODELS` (one model per family and distinct module structure): forward,
  backward, every parameter gets a gradient, grad checkpointing, dtype, intermediates, pruning, fx training,
  channels_last;
* the cheapest model of each family, or of each layer-attention family, for the slowest checks.
"""
import functools
import inspect

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.families import families, family_of
from _compile import assert_compiles_fullgraph
from _model_lists import (
    ALL_MODELS, CODE_PATHS, HEAVY, LAYER_ATTN, MODELS, REPRESENTATIVES, input_size, timm_models_of_this_package)

# Every registered name: the checks of the whole contract (scripting, fx, compile, export, features); the
# deepest models' are marked heavy (run with `-m heavy`) where a shallower variant with their module structure runs
# them by default (`_model_lists.HEAVY`).
EVERY = [pytest.param(n, marks=[pytest.mark.xdist_group(f'contract-{n}')] + [pytest.mark.heavy] * (n in HEAVY))
         for n in ALL_MODELS]
# The cheapest model of each layer-attention family, for the slow checks (AOT compile, channels_last kept).
LAYER_ATTN_REPRESENTATIVES = [n for n in REPRESENTATIVES if n in LAYER_ATTN]


def _size(model) -> int:
    return input_size(model.pretrained_cfg)


def _input(model, batch: int = 1) -> torch.Tensor:
    s = _size(model)
    return torch.randn(batch, model.in_chans, s, s + 8)


def _all_grads(model, out) -> None:
    out.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]} (+{max(0, len(missing) - 5)})'


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_all_params_used(name):
    """Every parameter receives a gradient (DDP without find_unused_parameters); grad checkpointing
    changes nothing."""
    model = timm.create_model(name, num_classes=42)
    x = _input(model, batch=2)
    model.train()
    out = model(x)
    assert out.shape == (2, 42)
    _all_grads(model, out)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(ref).all()


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_backward_matches(name):
    """Checkpointed blocks re-run with the carried state and give the same gradients. Each forward starts from
    one seed: dropout (GradAttn's token encoder) draws the same masks, and checkpointing restores the RNG state
    when it re-runs a block."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.).train()
    x = _input(model, batch=2)
    torch.manual_seed(1)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_api_contract_and_cfg(name):
    """Every name, on the meta device (shapes and structure only; real outputs of every name are compared in
    the `EVERY` checks)."""
    meta = dict(device='meta')
    model = timm.create_model(name, **meta)
    cfg = model.pretrained_cfg
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_argument=1, **meta)
    assert inspect.signature(model.reset_classifier).parameters['global_pool'].default is None
    groups = model.group_matcher()
    assert len(groups) > 1
    grouped = timm.models.group_parameters(model, groups)
    assert sum(len(g) for g in grouped.values()) == len(list(model.parameters()))
    assert model.num_classes == cfg['num_classes'] and model.in_chans == cfg['input_size'][0]
    assert model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    assert cfg['classifier'] + '.weight' in state and cfg['first_conv'] + '.weight' in state
    head = cfg['classifier']
    assert model.get_classifier() is model.get_submodule(head) and model.get_classifier(name_only=True) == head

    model.eval()
    x = torch.randn(1, *cfg['input_size'], **meta)
    with torch.no_grad():
        feat = model.forward_features(x)
        tokens = feat.ndim == 3  # a vision transformer's [B, N, C] tokens; NCHW maps otherwise
        if tokens:
            assert feat.shape[-1] == model.num_features
        else:
            assert feat.shape[1] == model.num_features and tuple(feat.shape[-2:]) == tuple(cfg['pool_size'])
        assert model.forward_head(feat, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, '')
        assert model(x).shape == (feat.shape if tokens else (1, model.num_features, *cfg['pool_size']))
        assert timm.create_model(name, num_classes=0, **meta).eval()(x).shape == (1, model.num_features)
        assert timm.create_model(name, num_classes=0, global_pool='', **meta)(x).ndim == feat.ndim


@pytest.mark.parametrize('name', MODELS)
def test_meta_device_dtype_and_frozen_reset(name):
    model = timm.create_model(name, device='meta')
    assert all(t.device.type == 'meta' for t in [*model.parameters(), *model.buffers()])
    model = timm.create_model(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.reset_classifier(7)
    assert model.get_classifier().weight.dtype == torch.bfloat16 and model.get_classifier().out_features == 7
    model = timm.create_model(name).eval().requires_grad_(False)
    model.reset_classifier(3)
    assert not model.training and model.get_classifier().training is False


@pytest.mark.parametrize('name', ALL_MODELS)
def test_meta_device_forward(name):
    """Built and run on the meta device, as timm's tests, accelerate and smp do to infer shapes: in training
    (where the memory-lean path, whose Functions switch autocast off, must step aside), and in eval with and
    without autograd (where the fused CPU kernels must)."""
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=7, device='meta')
        x = torch.randn(2, model.in_chans, _size(model), _size(model))
    assert model.train()(x).shape == (2, 7)
    model.eval()
    assert model(x).shape == (2, 7)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and out.device.type == 'meta'


def _family(name: str):
    try:
        return family_of(name)
    except KeyError:
        return None


def test_registry_families_cover_every_model():
    """Every model this package registers with timm belongs to exactly one family and is listed; every family
    has a registered model and a representative in the contract tests; every layer-attention family is in
    `MODELS`."""
    registered = timm_models_of_this_package()
    assert sorted(registered) == sorted(ALL_MODELS), 'models registered with timm but missing from list_models()'
    orphans = [n for n in registered if _family(n) is None]
    assert not orphans, f'registered models that belong to no family: {orphans}'
    owners = {}
    for family in families():
        assert family.models, f'family {family.name!r} has no models'
        missing = sorted(set(family.models) - set(registered))
        assert not missing, f'family {family.name!r} lists models timm does not know: {missing}'
        for n in family.models:
            assert owners.setdefault(n, family.name) == family.name, f'{n} in two families'
    for family in families():
        assert any(_family(n) is family for n in REPRESENTATIVES), f'family {family.name!r} has no representative'
        assert any(_family(n) is family for n in MODELS), f'family {family.name!r} is not in MODELS'
    assert set(CODE_PATHS) == set(MODELS) and set(REPRESENTATIVES) <= set(CODE_PATHS)
    assert {_family(n) for n in LAYER_ATTN} == {_family(n) for n in LAYER_ATTN if n in MODELS}
    assert LAYER_ATTN and LAYER_ATTN_REPRESENTATIVES


def _load_into_features(feats, model) -> None:
    """Load a full model's weights into a (pruned) FeatureGetterNet; only dropped parts may be left out."""
    result = feats.model.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    head = (model.pretrained_cfg['classifier'] + '.', 'conv_head.', 'bn2.',  # EfficientNet's head conv and norm
            'norm.', 'fc_norm.')  # a vision transformer's final norms
    assert all(k.startswith(('fc.', 'layer', *head)) for k in result.unexpected_keys), result.unexpected_keys


@pytest.mark.parametrize('name', MODELS)
def test_features_only_and_intermediates(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    n_levels = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-5)
        assert len(inter) == n_levels
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
        for t, f in zip(inter, model.feature_info):
            r = f['reduction']
            assert -(-x.shape[-2] // r) <= t.shape[-2] * 1 + 0 <= -(-x.shape[-2] // r) + 1, (t.shape, r)
        # stop_early and a subset give the same taps
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early, [inter[1], inter[2]])
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(last[0], inter[-1])
        # grad checkpointing does not change intermediates
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True), inter)

        feats = timm.create_model(name, features_only=True).eval()
        assert type(feats).__name__ == 'FeatureGetterNet'
        assert feats.feature_info.channels() == [f['num_chs'] for f in model.feature_info]
        assert feats.feature_info.reduction() == [f['reduction'] for f in model.feature_info]
        _load_into_features(feats, model)
        torch.testing.assert_close(feats(x), inter)
        sub = timm.create_model(name, features_only=True, out_indices=(1, n_levels - 1)).eval()
        _load_into_features(sub, model)
        torch.testing.assert_close(sub(x), [inter[1], inter[-1]])


@pytest.mark.parametrize('name', MODELS)
def test_prune_intermediate_layers(name):
    """Pruned models reproduce the taps and keep no unused parameters."""
    base = timm.create_model(name).eval()
    x = _input(base, batch=2)
    with torch.no_grad():
        ref = base.forward_intermediates(x, intermediates_only=True)
    for idx in range(1, len(base.feature_info)):
        model = timm.create_model(name).eval()
        model.load_state_dict(base.state_dict())
        kept = model.prune_intermediate_layers(indices=[idx], prune_head=True, prune_norm=True)
        assert kept == [idx]
        with torch.no_grad():
            out = model.forward_intermediates(x, indices=[idx], intermediates_only=True)
        torch.testing.assert_close(out[0], ref[idx])
        model.train()
        out = model.forward_intermediates(x, indices=[idx], intermediates_only=True)
        out[0].sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        assert model.num_features == base.feature_info[idx]['num_chs']


@pytest.mark.parametrize('name', MODELS)
def test_fx_feature_extraction(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    head = model.pretrained_cfg['classifier']
    fx = create_feature_extractor(model, return_nodes=[head])
    with torch.no_grad():
        # In eval mode the traced graph calls each layer-attention module, which runs as in eager.
        ref = model(x)
        torch.testing.assert_close(fx(x)[head], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # timm's fx feature extractor returns each level's last node: the stage output, not its carried state
    feats = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    assert type(feats).__name__ == 'FeatureGraphNet'
    assert not feats.graph_module.load_state_dict(model.state_dict(), strict=False).missing_keys
    with torch.no_grad():
        out = feats(x)
        tokens = out[0].ndim == 3  # a vision transformer's taps are its block outputs, prefix tokens included
        taps = model.forward_intermediates(x, intermediates_only=True, output_fmt='NLC' if tokens else 'NCHW')
    assert all(isinstance(t, torch.Tensor) for t in out), [type(t).__name__ for t in out]
    out = [t[:, model.num_prefix_tokens:] for t in out] if tokens else out
    torch.testing.assert_close(out, taps)
    fx.train()  # the graph shares the model's modules: this trains `model` too
    fx(torch.randn(2, *x.shape[1:]))[head].mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


@functools.lru_cache(maxsize=2)
def _reference(name: str):
    """`(eval model, input, eager output)`, built once per worker: a model's checks share its xdist group, which
    runs them one after the other, so the last two models suffice (all of them would hold gigabytes per worker).

    32 px is the smallest size every registered net takes (GradAttn's minimum is 28); the eager output may come
    from the fused CPU kernels, TorchScript, compile and export run PyTorch ops (other rounding).
    """
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, model.in_chans, 32, 32)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1., ref.abs().max().item()))


@pytest.mark.parametrize('name', EVERY)
def test_torchscript(name):
    model, x, ref = _reference(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        _assert_matches(scripted(x), ref)


@pytest.mark.parametrize('name', EVERY)
def test_torch_compile_fullgraph(name):
    """One graph, no breaks (`fullgraph=True`; the capture only: AOT functionalisation is covered by export)."""
    model, x, ref = _reference(name)
    assert_compiles_fullgraph(model, x, ref, backend='eager', rtol=1e-4, atol=1e-5 * max(1., ref.abs().max().item()))


@pytest.mark.parametrize('name', EVERY)
def test_torch_export(name):
    model, x, ref = _reference(name)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        _assert_matches(exported.module()(x), ref)


@pytest.mark.parametrize('name', EVERY)
def test_fx_every_model(name):
    """Symbolic tracing (timm's fx feature extraction) reproduces the model (`test_fx_feature_extraction`
    adds training and gradients for one model per code path), within timm's own fx tolerance (rtol 1e-4,
    atol 1e-5, its `test_model_forward_fx`): traced in eval mode, each layer-attention module is one graph node
    that takes the eager dispatch (fused CPU kernels included). Where fx traced their PyTorch ops instead,
    rounding alone moved `resnet101_mrlal`'s logits past that tolerance (at 32 px as at timm's 128 px)."""
    model, x, ref = _reference(name)
    head = model.pretrained_cfg['classifier']
    fx = create_feature_extractor(model, return_nodes=[head])
    with torch.no_grad():
        out = fx(x)[head]
    _assert_matches(out, ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', EVERY)
def test_features_every_model(name):
    """`forward_intermediates` and `features_only` agree on every level (`test_features_only_and_intermediates`
    adds index selection, pruning and checkpointing for one model per code path)."""
    model, x, ref = _reference(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        _assert_matches(model.forward_head(final), ref)
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
        feats = timm.create_model(name, features_only=True).eval()
        _load_into_features(feats, model)
        out = feats(x)
    assert len(out) == len(inter)
    for a, b in zip(out, inter):
        _assert_matches(a, b)


@pytest.mark.parametrize('name', LAYER_ATTN_REPRESENTATIVES)
def test_torch_compile_fullgraph_no_graph_breaks(name):
    model = timm.create_model(name).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        ref = model(x)
    assert_compiles_fullgraph(model, x, ref)


@pytest.mark.parametrize('name', MODELS)
def test_channels_last_and_in_chans(name):
    model = timm.create_model(name).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last))
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        for chans in (1, 4):
            m = timm.create_model(name, in_chans=chans, num_classes=5).eval()
            assert m(torch.randn(1, chans, *x.shape[-2:])).shape == (1, 5)


def test_channels_last_is_kept_through_the_attention_path():
    """Per-channel scales broadcast as [B, C, 1, 1] keep a channels_last operand's format."""
    for name in LAYER_ATTN_REPRESENTATIVES:
        model = timm.create_model(name).eval().to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            feats = model.forward_intermediates(x, intermediates_only=True)
        assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats[1:]), name


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_bad_input_errors(name):
    model = timm.create_model(name).eval()
    s = _size(model)
    with pytest.raises(AssertionError, match='3 input channels'):
        model(torch.randn(1, 4, s, s))
    with pytest.raises(AssertionError, match='4-D input'):
        model(torch.randn(3, s, s))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model(name + '_nope')
    with pytest.raises(TypeError):
        timm.create_model(name, heads=3)
    if name in LAYER_ATTN:  # the layer-attention families take a head width
        with pytest.raises(ValueError, match='divisible'):
            timm.create_model(name, head_dim=7)  # no block width splits into heads of 7 channels


def test_pretrained_without_weights_fails_clearly():
    """Every family's representative whose default tag has no weight source."""
    def has_source(name):
        cfg = timm.models.get_pretrained_cfg(name)
        return bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))
    names = [n for n in REPRESENTATIVES if not has_source(n)]
    assert names
    for name in names:
        with pytest.raises(RuntimeError, match='No pretrained weights'):
            timm.create_model(name, pretrained=True)
