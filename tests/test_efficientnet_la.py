"""EfficientNet-B0/B1/B2 with MRLA-light (docs/design/efficientnet_layer_attention.md).

Parameter counts against the official structure (`_reference_effnet`, a layout generator written from the official
code), the cells' placement and head widths, parity of converted official checkpoints with an independent
re-implementation of the official forward (eval logits within 1e-4 relative, models built with default arguments),
the official-layout rules (detection, strict conversion, timm's loading, the CLI), the warm start from timm's plain
EfficientNet, the model kwargs. The timm contract (scripting, fx, compile, export, features, grad checkpointing,
empty batch, ...) comes from the registry-driven tests.
"""
import pytest
import safetensors.torch
import timm
import torch
from timm.models._efficientnet_blocks import InvertedResidual

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official, load_trunk
from timm_layerattn._utils.errors import UserError
from timm_layerattn.cli import main as cli_main
from timm_layerattn.convert import convert_official_with_report, detect_official_family
from timm_layerattn.layers import MRLALight
from timm_layerattn.models.efficientnet_la import InvertedResidualMRLA
from _official import materialize, numel
from _reference_effnet import layout, official_effnet_forward, official_effnet_shapes

VARIANTS = ('b0', 'b1', 'b2')
FAMILY = 'efficientnet_mrla_light'


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _official(variant: str, seed: int = 0):
    return materialize(official_effnet_shapes(variant), seed=seed)


def _cells(model):
    return {n[:-len('.attn')]: m for n, m in model.named_modules() if isinstance(m, MRLALight)}


@pytest.mark.parametrize('variant,total,plain', [
    ('b0', 5_300_902, 5_288_548), ('b1', 7_815_798, 7_794_184), ('b2', 9_133_528, 9_109_994)])
def test_param_counts_match_official_structure(variant, total, plain):
    """The official structure's count (every parameter, BN statistics aside) is the model's; the plain timm
    EfficientNet is the reference the cells add to (12 C + 2 k per cell of width C, ECA kernel k)."""
    model = timm.create_model(f'efficientnet_{variant}_mrlal', device='meta')
    assert numel(official_effnet_shapes(variant)) == _n_params(model) == total
    assert _n_params(timm.create_model(f'efficientnet_{variant}', device='meta')) == plain
    assert total - plain == sum(12 * m.channels + 2 * m.q.weight.numel() for m in _cells(model).values())


@pytest.mark.parametrize('variant', VARIANTS)
def test_cells_on_inverted_residuals_with_a_skip(variant):
    """A cell after every InvertedResidual with a skip and nowhere else (not the DepthwiseSeparable block, not the
    first block of a stage), 8 heads each, named as the official blocks."""
    model = timm.create_model(f'efficientnet_{variant}_mrlal', device='meta')
    _, blocks, _ = layout(variant)
    want = {b.prefix[:-1] for b in blocks if b.kind == 'ir' and b.skip}
    cells = _cells(model)
    assert set(cells) == want and len(want) == {'b0': 9, 'b1': 15, 'b2': 15}[variant]
    for name, block in ((n, m) for n, m in model.named_modules() if isinstance(m, InvertedResidual)):
        assert isinstance(block, InvertedResidualMRLA) == (name in want) == block.has_skip
    assert all(m.num_heads == 8 and m.head_dim == m.channels // 8 for m in cells.values())


@pytest.mark.parametrize('training', [False, True])
def test_block_body_is_timms_forward(training):
    """`forward_block` (timm's body, restated for TorchScript) equals timm's `InvertedResidual.forward`."""
    torch.manual_seed(0)
    model = timm.create_model('efficientnet_b0_mrlal').train(training)
    x = torch.randn(2, 24, 8, 8)
    block = model.blocks[1][1]
    assert isinstance(block, InvertedResidualMRLA)
    torch.testing.assert_close(block.forward_block(x), InvertedResidual.forward(block, x), rtol=0, atol=0)


def test_cell_reads_block_output_and_shortcut():
    """The block's output is the cell applied to (timm's block output, the block input)."""
    torch.manual_seed(0)
    model = timm.create_model('efficientnet_b0_mrlal').eval()
    block = model.blocks[2][1]
    x = torch.randn(2, 40, 8, 8)
    with torch.no_grad():
        want = block.attn.forward_reference(InvertedResidual.forward(block, x), x, [])[0]
        torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-6)


def test_drop_path_rate_is_the_blocks():
    """`drop_path_rate` is timm's stochastic depth; each cell drops its branch at its block's rate (official)."""
    model = timm.create_model('efficientnet_b0_mrlal', drop_path_rate=0.2, device='meta')
    for name, cell in _cells(model).items():
        block = model.get_submodule(name)
        assert cell.drop_path.drop_prob == block.drop_path.drop_prob > 0


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('grad', [False, True])
def test_official_parity(variant, grad):
    """A converted official checkpoint, default arguments: eval logits equal the official forward within 1e-4
    relative, on the fused kernels (no autograd) and on the folded PyTorch path (autograd on)."""
    name = f'efficientnet_{variant}_mrlal'
    official = _official(variant, seed=1)
    converted, report = convert_official_with_report(official, name)
    assert report.family == FAMILY and not report.dropped and report.num_tensors == len(official)
    model = timm.create_model(name).eval()
    model.load_state_dict(converted)
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        ref = official_effnet_forward(official, variant, x)
    with torch.set_grad_enabled(grad):
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_official_layout_is_detected_and_only_by_this_family():
    official = {k: torch.empty(v, device='meta') for k, v in official_effnet_shapes('b0').items()}
    assert detect_official_family(official) == FAMILY
    with pytest.raises(UserError, match=f'official {FAMILY} checkpoint'):
        convert_official(official, 'resnet50_mrlal')
    converted = convert_official(official, 'efficientnet_b0_mrlal')
    assert 'blocks.1.1.attn.q.weight' in converted and 'blocks.1.1.attn.norm.running_var' in converted
    assert detect_official_family(converted) is None  # this package's layout


def test_strict_conversion_names_the_problem():
    official = {k: torch.empty(v, device='meta') for k, v in official_effnet_shapes('b0').items()}
    missing = dict(official)
    del missing['blocks.5.3.mrla.lambda_t']
    with pytest.raises(UserError, match='blocks.5.3.attn.lambda_t'):
        convert_official(missing, 'efficientnet_b0_mrlal')
    with pytest.raises(UserError, match=r'blocks\.3\.0\.mrla\.lambda_t|blocks.3.0.attn.lambda_t'):
        convert_official({**official, 'blocks.3.0.mrla.lambda_t': torch.empty(80, 1, 1)}, 'efficientnet_b0_mrlal')
    with pytest.raises(UserError):  # a B1 checkpoint (more blocks) into B0
        convert_official({k: torch.empty(v, device='meta') for k, v in official_effnet_shapes('b1').items()},
                         'efficientnet_b0_mrlal')
    plain = timm.create_model('efficientnet_b0', device='meta').state_dict()
    with pytest.raises(UserError, match='load_trunk'):
        convert_official(plain, 'efficientnet_b0_mrlal')


def test_official_file_loads_through_timm_and_cli(tmp_path):
    """The rules' filter renames an official file at `create_model(..., pretrained=True)`; the CLI converts one."""
    official = _official('b0', seed=2)
    src = tmp_path / 'official.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in official.items()}}, src)
    model = timm.create_model('efficientnet_b0_mrlal', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(src))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = official_effnet_forward(official, 'b0', x)
        assert (model(x) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    out = tmp_path / 'converted.safetensors'
    assert cli_main(['convert', '--model', 'efficientnet_b0_mrlal', str(src), str(out)]) == 0
    converted = safetensors.torch.load_file(out)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_load_trunk_from_timm_efficientnet():
    """timm's plain efficientnet_b0 weights fill every trunk tensor and the classifier; only the cells stay at
    their init."""
    torch.manual_seed(0)
    source = timm.create_model('efficientnet_b0').state_dict()
    model = timm.create_model('efficientnet_b0_mrlal')
    result = load_trunk(model, source)
    state = model.state_dict()
    assert set(result.loaded) == set(source) and all(torch.equal(state[k], source[k]) for k in source)
    assert result.missing and all('.attn.' in k for k in result.missing)
    assert set(result.missing) == set(state) - set(source)


def test_num_heads_and_head_dim():
    cells = _cells(timm.create_model('efficientnet_b0_mrlal', num_heads=4, device='meta')).values()
    assert all(m.num_heads == 4 for m in cells)
    cells = _cells(timm.create_model('efficientnet_b2_mrlal', head_dim=8, device='meta')).values()
    assert all(m.head_dim == 8 and m.num_heads == m.channels // 8 for m in cells)
    cases = [
        (dict(num_heads=3), ValueError, 'efficientnet_b0_mrlal: num_heads must be one of 1, 2, 4, 8 (heads per cell: '
                                        'every cell width 24, 40, 80, 112, 192 must be divisible into heads), got 3'),
        (dict(num_heads=8.0), TypeError, 'got 8.0'),
        (dict(head_dim=48), ValueError, 'divisible'),
        (dict(head_dim=0), ValueError, 'head_dim must be one of 1, 2, 4, 8'),
        (dict(num_heads=4, head_dim=8), ValueError, 'give num_heads or head_dim, not both'),
        (dict(drop_path_rate=1.5), ValueError, 'drop_path_rate must be a probability in [0, 1), got 1.5'),
        (dict(output_stride=4), ValueError, 'output_stride must be one of 8, 16, 32, got 4'),
        (dict(global_pool='', num_classes=5), ValueError, "global_pool='' (no pooling) needs num_classes=0"),
    ]
    for kwargs, exc, fragment in cases:
        with pytest.raises(exc) as info:
            timm.create_model('efficientnet_b0_mrlal', device='meta', **kwargs)
        assert fragment in str(info.value) and '\n' not in str(info.value), (kwargs, str(info.value))


def test_bad_inputs_are_refused_everywhere():
    """The stem refuses inputs that cannot be images of the model, whichever entry point runs it."""
    model = timm.create_model('efficientnet_b0_mrlal').eval()
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(AssertionError, match='expects 3 input channels'):
            call(torch.randn(1, 4, 32, 32))
        with pytest.raises(AssertionError, match='4-D input'):
            call(torch.randn(3, 32, 32))
        with pytest.raises(AssertionError, match='floating-point'):
            call(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_finite_like_the_plain_trunk(dtype):
    """Under CPU autocast (bfloat16, float16) logits and gradients stay finite, as for timm's efficientnet_b0;
    eval logits stay close to float32."""
    torch.manual_seed(0)
    model = timm.create_model('efficientnet_b0_mrlal', num_classes=10)
    x = torch.randn(2, 3, 32, 32)  # float16 convolutions are slow on CPU
    with torch.autocast('cpu', dtype=dtype):
        out = model.train()(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=dtype):
            low = model(x)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
