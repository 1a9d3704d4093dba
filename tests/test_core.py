"""The reusable core: what the open ResNet trunk can express and where a strategy's hooks run.

Each test builds something the trunk could not build before the core split (any number of stages, per-stage
strides, a stride-1 stem without max-pool, other activations and norms, registered blocks and stems) or
checks a hook's place in the block tail (pre-residual module, strategy init, unit contract).
"""
from dataclasses import dataclass, replace
from typing import Optional, Type

import pytest
import timm
import torch
import torch.nn as nn

import timm_layerattn
from timm_layerattn.core import BlockSite, LayerStrategy, LAStage
from timm_layerattn.families import families, family_of
from timm_layerattn.layers import LayerAttnCfg, lean
from timm_layerattn.models.resnet_blocks import BLOCKS, STEMS, LABasicBlock, StemCfg, register_block, register_stem
from timm_layerattn.models.resnet_la import BlockAttention
from timm_layerattn.models.resnet_trunk import ResNetLA, ResNetLACfg

KCLA = BlockAttention(LayerAttnCfg('kcla', head_dim=4, drop_path=0., rebuild_blocks=(0,)))


def _run(model: nn.Module, size=(32, 40), batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, model.in_chans, *size))


def test_segmentation_encoder_layout():
    """KCLA's UNet encoder: BasicBlocks 32/64/128/128, stride-1 7x7 stem without max-pool, strides 2/2/2/1."""
    cfg = ResNetLACfg(layers=(2, 2, 2, 2), channels=(32, 64, 128, 128), block='basic', strides=(2, 2, 2, 1),
                      stem_type='conv7_s1', stem_width=32, strategy=KCLA)
    model = ResNetLA(cfg, num_classes=0)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (1, 1)
    assert [f['reduction'] for f in model.feature_info] == [1, 2, 4, 8, 8]
    assert [f['num_chs'] for f in model.feature_info] == [32, 32, 64, 128, 128]
    feats = model.forward_intermediates(torch.randn(1, 3, 64, 48), intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 48), (32, 24), (16, 12), (8, 6), (8, 6)]


@pytest.mark.parametrize('layers', [(2,), (1, 2), (1, 1, 1, 1, 1)])
def test_any_number_of_stages(layers):
    n = len(layers)
    cfg = ResNetLACfg(layers=layers, channels=tuple(4 * 2 ** i for i in range(n)), stem_type='cifar', stem_width=16,
                      strategy=KCLA)
    model = ResNetLA(cfg, num_classes=5)
    assert model.stage_names == tuple(f'layer{i + 1}' for i in range(n))
    assert [f['reduction'] for f in model.feature_info] == [1] + [2 ** i for i in range(n)]
    assert _run(model, (32, 32)).shape == (2, 5)
    features = timm.create_model('cifar_resnet20_kcla', features_only=True, pretrained=False)
    assert len(features.feature_info) == 4  # the registered 3-stage nets keep their default levels
    # grad checkpointing threads the carried state through any stage count
    model.train()
    model.set_grad_checkpointing()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_default_strides_and_dilation_unchanged():
    cfg = ResNetLACfg(layers=(1, 1, 1, 2))
    assert cfg.stage_strides == (1, 2, 2, 2)
    model = ResNetLA(cfg, num_classes=0, output_stride=8)
    assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 8, 8]
    assert [model.layer4[i].conv2.dilation for i in range(2)] == [(2, 2), (4, 4)]  # timm's dilation schedule


def test_act_and_norm_layers_reach_stem_and_blocks():
    cfg = ResNetLACfg(layers=(1, 1), channels=(8, 16), block='basic', stem_type='cifar', stem_width=8,
                      act_layer='silu', norm_layer='groupnorm1')
    model = ResNetLA(cfg, num_classes=3)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.SiLU))]
    assert acts and all(isinstance(m, nn.SiLU) for m in acts)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.bn1, nn.GroupNorm) and isinstance(model.layer2[0].downsample[1], nn.GroupNorm)
    assert torch.isfinite(_run(model)).all()


def test_block_and_stem_registries():
    @register_block('test_wide_basic')
    class WideBasic(LABasicBlock):
        expansion = 2

    register_stem('test_conv5', StemCfg(lambda c, w, norm, act, dd: nn.Conv2d(c, w, 5, 2, 2, bias=False, **dd),
                                        stride=2, pool=False))
    try:
        cfg = ResNetLACfg(layers=(1, 1), channels=(8, 16), block='test_wide_basic', stem_type='test_conv5',
                          stem_width=8)
        assert cfg.block_widths() == (16, 32)
        model = ResNetLA(cfg, num_classes=0)
        assert isinstance(model.layer1[0], WideBasic) and model.conv1.kernel_size == (5, 5)
        assert [f['reduction'] for f in model.feature_info] == [2, 2, 4]
        assert _run(model).shape == (2, 32)
    finally:
        del BLOCKS['test_wide_basic'], STEMS['test_conv5']


class _Gate(nn.Module):
    """A pre-residual module that records its input and scales the branch by `scale`."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.seen = None

    def forward(self, x, state):
        self.seen = x.detach().clone()
        return x * self.scale, state


@dataclass(frozen=True)
class _PreResidual(BlockAttention):
    scale: float = 0.

    def block_pre_residual(self, site: BlockSite, norm_layer: Type[nn.Module], dd) -> Optional[nn.Module]:
        return _Gate(self.scale)


def test_pre_residual_hook_sits_between_last_norm_and_residual():
    cfg = ResNetLACfg(layers=(1, 1), channels=(8, 16), block='basic', stem_type='cifar', stem_width=8,
                      strategy=_PreResidual(KCLA.attn, scale=0.))
    model = ResNetLA(cfg, num_classes=0).eval()
    block = model.layer1[0]
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected_norm = block.forward_last_norm(block.forward_convs(x))
        attn_in = {}
        block.attn.register_forward_pre_hook(lambda m, args: attn_in.update(x=args[0].clone()))
        block(x, [], [])
    torch.testing.assert_close(block.attn_pre.seen, expected_norm)  # after the last norm
    torch.testing.assert_close(attn_in['x'], torch.relu(x))  # branch gated to 0: the residual alone, activated


def test_pre_residual_block_trains_like_the_plain_path():
    """With a pre-residual module the memory-lean tail (which fuses norm + residual) must not apply."""
    cfg = ResNetLACfg(layers=(1, 1), channels=(16, 32), stem_type='cifar', stem_width=16,
                      strategy=_PreResidual(KCLA.attn, scale=0.5))
    torch.manual_seed(0)
    model = ResNetLA(cfg, num_classes=4).train()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    with lean.disabled():
        ref = model(x)
    torch.testing.assert_close(out, ref)
    assert model.layer1[0].attn_pre.seen is not None


@dataclass(frozen=True)
class _InitMarks(BlockAttention):
    def init_weights(self, model) -> None:
        for stage in model.stages():
            for block in stage.blocks():
                nn.init.constant_(block.attn.q.weight, 0.25)


def test_strategy_init_hook_runs_after_the_trunk_init():
    cfg = ResNetLACfg(layers=(1, 1), channels=(8, 16), stem_type='cifar', stem_width=16, strategy=_InitMarks(KCLA.attn))
    model = ResNetLA(cfg, num_classes=0)
    assert all(torch.all(s[0].attn.q.weight == 0.25) for s in model.stages())
    # the default hook changes nothing: a plain strategy's model equals the seed-for-seed init of before
    torch.manual_seed(0)
    a = ResNetLA(replace(cfg, strategy=KCLA), num_classes=0).state_dict()
    torch.manual_seed(0)
    b = ResNetLA(replace(cfg, strategy=BlockAttention(KCLA.attn)), num_classes=0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_is_the_unit_runner():
    """`LAStage` runs any units with the `(x, state, shared)` contract and checkpoints them with the state."""
    class AddState(nn.Module):
        def forward(self, x, state, shared):
            return x + shared[0], state + [x.mean().reshape(1)]

    stage = LAStage(AddState(), AddState(), pre=AddState())
    x, shared = torch.randn(3, requires_grad=True), [torch.ones(3)]
    out, state = stage(x, [], shared)
    stage.grad_checkpointing = True
    out2, state2 = stage(x, [], shared)
    torch.testing.assert_close(out, out2)
    assert len(state) == len(state2) == 3
    (out2.sum() + sum(s.sum() for s in state2)).backward()
    assert x.grad is not None
    assert [n for n, _ in stage.named_children()] == ['attn_in', '0', '1']


def test_every_registered_model_has_a_family_and_its_module():
    """`register_family` records each family's model modules from its callers: every registered name is
    listed by timm under one of its family's modules."""
    names = timm_layerattn.models.list_models()
    assert names and len(names) == sum(len(f.models) for f in families())
    for name in names:
        family = family_of(name)
        assert name in family.models
        assert any(name in timm.list_models(module=m) for m in family.modules), (name, family.modules)


def test_family_kwargs_are_stated_once_and_applied():
    model = timm.create_model('cifar_resnet20_kcla', head_dim=8)
    assert model.cfg.strategy.attn.head_dim == 8
    model = timm.create_model('cifar_resnet50_as_out', as_heads=8, as_dim=64)
    assert model.cfg.strategy.cfg.num_heads == 8 and model.cfg.block_widths() == (64,) * 4
    with pytest.raises(TypeError, match="does not take 'as_dim'"):
        timm.create_model('cifar_resnet50_as_kv', as_dim=64)
    with pytest.raises(TypeError, match='unexpected keyword'):
        timm.create_model('cifar_resnet20_kcla', as_heads=8)  # another family's kwarg reaches the model class
