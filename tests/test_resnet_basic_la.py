"""BasicBlock ResNet-18 / 34 with KCLA, MRLA-light and MRLA-base (docs/design/layer_attention.md#la-basic-imagenet):
timm's `resnet18` / `resnet34` trunk under timm's names, one attention cell per block, parameter counts from the
cells' formulas, warm start from timm weights, and the attention maths on a BasicBlock's output."""
import contextlib
import copy
import math

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import load_trunk
from timm_layerattn.layers import KCLA, MRLABase, MRLALight, lean, native

from _layer_attn import n_params

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)
HEAD_DIM = {'kcla': 32, 'mrlal': 32, 'mrlab': 16}
NAMES = [f'resnet{d}_{a}' for d in DEPTHS for a in HEAD_DIM]
# The README's table (docs: #la-basic-imagenet), checked against the cell formulas below.
README_PARAMS = {
    'resnet18_kcla': 11_727_527, 'resnet18_mrlal': 11_712_624, 'resnet18_mrlab': 11_710_704,
    'resnet34_kcla': 21_856_727, 'resnet34_mrlal': 21_843_132, 'resnet34_mrlab': 21_839_356,
}


def _eca_k(c: int) -> int:
    t = int(abs((math.log(c, 2) + 1) / 2))
    return t if t % 2 else t + 1


def _cell_params(attn: str, c: int, c_in: int, rebuild: bool) -> int:
    """One cell: ECA query and key (k taps each), depth-wise 3x3 value, branch BatchNorm, plus the family's own."""
    k, g = _eca_k(c), c // HEAD_DIM[attn]
    n = 2 * k + 9 * c + 2 * c
    if attn == 'mrlal':
        n += c  # lambda on the shortcut
    elif attn == 'kcla':
        n += g * g  # head gate
        if rebuild:  # history re-summary: grouped 1x1 projection (width change), key conv, BatchNorm
            n += c * (c_in // g) + k + 2 * c
    return n


@pytest.mark.parametrize('name', NAMES)
def test_param_counts_are_timm_trunk_plus_cells(name):
    depth, attn = int(name[6:8]), name.split('_')[1]
    expected = n_params(f'resnet{depth}')
    prev = None
    for width, blocks in zip(WIDTHS, DEPTHS[depth]):
        for i in range(blocks):
            expected += _cell_params(attn, width, prev or width, rebuild=i == 0 and prev is not None)
            prev = width
    assert n_params(name) == expected == README_PARAMS[name]


@pytest.mark.parametrize('name', NAMES)
def test_trunk_is_timms_and_warm_starts_from_its_weights(name, tmp_path):
    """Every tensor of timm's `resnet18` / `resnet34` has the same name and shape here; `load_trunk` from a
    saved timm checkpoint copies all of them (classifier included) and leaves only the cells at init."""
    torch.manual_seed(0)
    plain = timm.create_model(f'resnet{name[6:8]}')
    path = tmp_path / 'trunk.pth'
    torch.save(plain.state_dict(), path)
    model = timm.create_model(name)
    result = load_trunk(model, path)
    ours = model.state_dict()
    assert set(plain.state_dict()) <= set(ours)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    assert set(result.missing) == {k for k in ours if k not in plain.state_dict()}
    assert all('.attn.' in k for k in result.missing)


@pytest.mark.parametrize('name', NAMES)
def test_each_basic_block_carries_its_cell(name):
    """One cell per block of the family's type and head dim, the block's output width, KCLA re-summarising
    the incoming history at each later stage's first block, MRLA-base resetting its cache there."""
    depth, attn = int(name[6:8]), name.split('_')[1]
    model = timm.create_model(name, device='meta')
    cls = {'kcla': KCLA, 'mrlal': MRLALight, 'mrlab': MRLABase}[attn]
    for s, (width, blocks) in enumerate(zip(WIDTHS, DEPTHS[depth])):
        for i in range(blocks):
            cell = getattr(model, f'layer{s + 1}')[i].attn
            assert type(cell) is cls and cell.channels == width and cell.head_dim == HEAD_DIM[attn]
            if attn == 'kcla':
                assert (cell.hist_norm is not None) == (i == 0 and s > 0)
            if attn == 'mrlab':
                assert cell.first_in_stage == (i == 0)


@pytest.mark.parametrize('name', ['resnet18_kcla', 'resnet18_mrlal', 'resnet18_mrlab'])
def test_lean_and_fused_paths_equal_the_plain_path_on_basic_blocks(name):
    """Training step through the memory-lean tail (BasicBlock's bn2 + residual + ReLU) on the fused kernels
    equals the plain path: outputs, input gradients and every parameter gradient."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)

    def step(m, context):
        inp = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same drop-path draws on both paths
        with context:
            out = m(inp)
            out.square().sum().backward()
        return out.detach(), inp.grad, {k: p.grad for k, p in m.named_parameters()}

    fast = step(copy.deepcopy(model), lean.forced())
    with lean.disabled(), native.disabled():
        plain = step(model, contextlib.nullcontext())
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-3, atol=1e-5)
    scale = max(g.abs().max().item() for g in plain[2].values())
    for k in plain[2]:
        assert (fast[2][k] - plain[2][k]).abs().max().item() <= 1e-4 * scale, k
