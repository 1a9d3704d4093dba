"""Checkpoints in: official KCLA / MRLA / CNNtention layouts converted, and timm-ResNet trunk warm starts.

* `convert_official(state_dict, model_name)` maps a checkpoint saved by the authors' code (bgx666/KCLA,
  joyfang1106/MRLA, AttentionSeekers/CNNtention) to this package's layout and checks it strictly
  against the target architecture: unknown keys, missing keys and shape mismatches are errors naming the
  key; the official modules that never run are dropped with a logged note.
* `load_trunk(model, source)` copies every matching backbone tensor of a timm ResNet checkpoint into a
  layer-attention model and leaves the attention modules at their init.

Reading (`read_state_dict`: safetensors or `torch.load(weights_only=True)`, training containers unwrapped),
strict matching and each family's key rules live in `timm_layerattn.checkpoints`; this module uses them.
`timm-layerattn convert --model NAME IN OUT.safetensors` is the command-line form of `convert_official`.
"""
import argparse
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._utils.errors import UserError
from ._utils.files import atomic_file
from . import models  # noqa: F401  (registers every family)
from .families import Family, find_family
from .checkpoints.io import check_finite, read_state_dict, unwrap_state_dict
from .checkpoints.match import blocks_per_stage, check_state_dict, layout_of, suggest_arch
from .checkpoints.rules import CheckpointRules, Remapped, official_layout, unsupported_layout

__all__ = ['convert_official', 'convert_official_with_report', 'detect_official_family', 'load_trunk',
           'TrunkLoadResult']

_logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]



# ---------------------------------------------------------------------------------------------------------------
# Official layouts
# ---------------------------------------------------------------------------------------------------------------

def detect_official_family(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Which official code wrote `state_dict` (an official layout's name, e.g. 'kcla', 'mrla_light', 'mrla_base',
    'cnntention', the baselines' layouts), or None.

    None means the keys are in this package's (= timm / torchvision) layout, which is also the layout of
    the official plain CIFAR ResNets. Asks every registered family's checkpoint rules (`official_layout`), after
    the layouts only recognised to be refused (`checkpoints.rules.UNSUPPORTED_LAYOUTS`). Where several official
    codes write the same keys (the KCLA repository's CIFAR MRLA-base, full and linear layer attention), this names
    the first claimant; `convert_official` lets the target's family claim the file.
    """
    unsupported = unsupported_layout(state_dict)
    return unsupported.name if unsupported is not None else official_layout(state_dict)


@dataclass
class ConversionReport:
    """What `convert_official` did: detected family, KCLA head dim, dropped (never-used) official keys."""
    family: Optional[str]
    model_name: str
    head_dim: Optional[int] = None
    dropped: List[str] = field(default_factory=list)
    filled: List[str] = field(default_factory=list)
    num_tensors: int = 0

    def summary(self) -> str:
        text = f"{self.num_tensors} tensors for '{self.model_name}' from a {self.family or 'timm-layout'} checkpoint"
        if self.head_dim:
            text += f' (KCLA head_dim {self.head_dim})'
        if self.dropped:
            text += f'; dropped {len(self.dropped)} official parameter(s) that never run: ' + ', '.join(self.dropped)
        if self.filled:
            text += f'; added {len(self.filled)} missing BatchNorm counter(s)'
        return text


def _target(model_name: str, num_classes: Optional[int], in_chans: Optional[int], head_dim: Optional[int]):
    """The target model on the meta device (no memory, no compute), its family, and the official layout it
    takes: its family's name when the family's rules convert one and the model has the family's strategy,
    'plain' for a ResNet without one (its official checkpoints are in timm's layout), 'other' for a model
    that is not ours."""
    import timm
    from timm.models import is_model, split_model_name_tag
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    kwargs = {k: v for k, v in dict(num_classes=num_classes, in_chans=in_chans, head_dim=head_dim).items()
              if v is not None}
    try:
        model = timm.create_model(arch, device='meta', **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f'cannot build {arch} with {kwargs}: {e}') from None
    cfg = getattr(model, 'cfg', None)
    family = find_family(arch)
    rules = family.rules if family is not None else None
    if rules is not None and rules.converts and getattr(cfg, 'strategy', None) is not None:
        return arch, model, family, family.name
    return arch, model, family, 'plain' if hasattr(cfg, 'layers') else 'other'



def _suggest_arch(family: str, state_dict: Mapping[str, Any], stem_type: str) -> Optional[str]:
    """A registered architecture of `family` that `state_dict` (in this package's layout) fits, with stem
    `stem_type` (`checkpoints.match.suggest_arch`)."""
    return suggest_arch(replace(layout_of(state_dict), kind=family), stem_type)


def _rules(family: Optional[Family]) -> CheckpointRules:
    return family.rules if family is not None and family.rules is not None else CheckpointRules()


def convert_official_with_report(
        state_dict: Mapping[str, Any],
        model_name: str,
        *,
        head_dim: Optional[int] = None,
) -> Tuple[StateDict, ConversionReport]:
    """`convert_official`, also returning a `ConversionReport`.

    Generic over the families: the official layout is detected through the registry, and the target family's
    checkpoint rules (`Family.rules`) check the source against the target (`check_source`), rename it and
    drop the official modules that never run (`remap`, as timm's entry points do) and check the values they
    fix (`validate`).
    """
    sd, _ = unwrap_state_dict(state_dict)
    unsupported = unsupported_layout(sd)
    if unsupported is not None:
        raise UserError(unsupported.message)
    official = official_layout(sd)

    fc_w = sd.get('fc.weight')
    num_classes = fc_w.shape[0] if fc_w is not None and fc_w.ndim == 2 else None
    stem_w = sd.get('conv1.weight', sd.get('conv1.0.weight'))
    in_chans = stem_w.shape[1] if stem_w is not None and stem_w.ndim == 4 else None
    arch, model, family, target = _target(model_name, num_classes, in_chans, head_dim)
    rules = _rules(family)
    if official is not None and rules.official_type(sd) == target:
        # A layout that several official models share (the KCLA repository's CIFAR MRLA-base, full and linear
        # layer attention cells): the target family reads it as its own.
        official = target
    if official is not None and official != target:
        raise UserError(f"this is an official {official} checkpoint, but '{arch}' is a {target} model")
    cfg = getattr(model, 'cfg', None)
    info = rules.check_source(sd, arch, cfg)

    expected = model.state_dict()
    remapped = rules.remap(sd, expected) if official is not None else Remapped(dict(sd))
    renamed, source_names = remapped.state_dict, remapped.source_names
    layers = blocks_per_stage(renamed)
    if cfg is not None and hasattr(cfg, 'layers') and layers and layers != tuple(cfg.layers):
        hint = _suggest_arch(target, renamed, cfg.stem_type)
        raise UserError(
            f"the checkpoint has {'-'.join(map(str, layers))} blocks per stage but '{arch}' has "
            f"{'-'.join(map(str, cfg.layers))}" + (f"; use '{hint}'" if hint else ''))
    rules.validate(renamed, expected, source_names)

    report = ConversionReport(family=official, model_name=arch, dropped=list(remapped.dropped), **info)
    out: StateDict = dict(renamed)
    for k in expected:
        if k not in out and k.endswith('.num_batches_tracked'):
            out[k] = torch.zeros((), dtype=torch.long)
            report.filled.append(k)
    check_state_dict(out, expected, what=f"'{arch}'", source_names=source_names)
    out = {k: out[k] for k in expected}
    report.num_tensors = len(out)
    if report.dropped:
        _logger.info(f'convert_official: dropped official parameters that never run: {", ".join(report.dropped)}')
    return out, report


def convert_official(
        state_dict: Mapping[str, Any],
        model_name: str,
        *,
        head_dim: Optional[int] = None,
) -> StateDict:
    """Map a checkpoint of the official KCLA / MRLA / CNNtention code to `model_name`'s state dict.

    Accepts a plain state dict or a training-script checkpoint (`state_dict` nesting, `module.` prefixes).
    Strict: the official modules that never run (KCLA's unused re-init parts) are dropped with a logged note;
    any other key the model lacks, any key it needs that is missing and any shape mismatch raise a
    `UserError` naming the key. A KCLA checkpoint's head dim is read from `norm_d`; a model built with
    another head dim is refused with the value to use (`head_dim=` builds the target with it).

    Args:
        state_dict: The official checkpoint (or its `state_dict`).
        model_name: Target architecture, e.g. 'resnet50_kcla' or 'cifar_resnet56_mrlal'.
        head_dim: KCLA head dim of the target model, when it differs from the registered default.

    Returns:
        A state dict that `timm.create_model(model_name, ...)` loads with `strict=True`.
    """
    return convert_official_with_report(state_dict, model_name, head_dim=head_dim)[0]


# ---------------------------------------------------------------------------------------------------------------
# Trunk warm start
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrunkLoadResult:
    """Outcome of `load_trunk`: which model tensors were loaded, which stay at init, which source keys were unused."""
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # model keys left at their init
    skipped: Dict[str, str] = field(default_factory=dict)  # source key -> reason
    adapted: Dict[str, str] = field(default_factory=dict)  # model key -> how it was adapted (first conv)

    def summary(self) -> str:
        attn = sum(_is_attention_key(k) for k in self.missing)
        reasons: Dict[str, int] = {}
        for r in self.skipped.values():
            reasons[r] = reasons.get(r, 0) + 1
        skipped = ', '.join(f'{n} {r}' for r, n in sorted(reasons.items())) or 'none'
        adapted = ''.join(f'; {k} {how}' for k, how in self.adapted.items())
        return (f'loaded {len(self.loaded)} tensors; left {len(self.missing)} at init ({attn} attention, '
                f'{len(self.missing) - attn} other); skipped source tensors: {skipped}{adapted}')


_VIT_SELF_ATTN = re.compile(r'^blocks\.\d+\.attn\.')  # a ViT block's own self-attention: trunk


def _is_attention_key(key: str) -> bool:
    if _VIT_SELF_ATTN.match(key):  # (a ViT's layer attention is `blocks.i.layer_attn`)
        return False
    return '.attn.' in key or '.attn_in.' in key or '.layer_attn.' in key or key.startswith('as_proj.')


def _adapt_first_conv(key: str, weight: torch.Tensor, want: torch.Tensor, origin: str) -> Tuple[torch.Tensor, str]:
    """The source's first conv `weight` adapted to the model's input channels as timm's pretrained loader does
    (`adapt_input_conv`: summed for 1 channel, repeated and rescaled for more), or a `UserError` saying why not."""
    from timm.models._manipulate import adapt_input_conv
    have, need = int(weight.shape[1]), int(want.shape[1])
    try:
        adapted = adapt_input_conv(need, weight, base_chans=have)
    except (NotImplementedError, ValueError, AssertionError) as e:
        raise UserError(f'load_trunk: cannot adapt the first conv {key} of {origin} from {have} to {need} input '
                        f'channels ({e or type(e).__name__})') from None
    if tuple(adapted.shape) != tuple(want.shape):
        raise UserError(f'load_trunk: cannot adapt the first conv {key} of {origin} {tuple(weight.shape)} to the '
                        f"model's {tuple(want.shape)}: only its input channels may differ")
    return adapted, f'adapted from {have} to {need} input channels (timm adapt_input_conv)'


def load_trunk(
        model: nn.Module,
        source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
        *,
        load_classifier: bool = True,
) -> TrunkLoadResult:
    """Initialise a layer-attention model's backbone from a timm (or torchvision) ResNet checkpoint.

    Every source tensor whose name and shape match a non-attention tensor of `model` is copied; the
    attention modules keep their initialisation. The first conv is adapted to the model's `in_chans` as timm's
    pretrained loader does (`adapt_input_conv`). The practical way to fine-tune these models from ImageNet
    weights while no layer-attention weights are published.

    Refused (`UserError`): a source of which no tensor fits the model's trunk (another architecture), one
    holding NaN / Inf values (named), a first conv that cannot be adapted. A partial load (trunk tensors of the
    model left at init, the classifier aside) is logged at WARNING with the counts, a full one at INFO.

    Args:
        model: The model to initialise in place.
        source: A timm model name with pretrained tag ('resnet50.a1_in1k', downloaded through timm), a
            checkpoint file (safetensors / torch, read with weights_only=True by the package's one reader, which
            also takes timm train.py checkpoints) or a state dict.
        load_classifier: Also copy the classifier when its shape matches (same number of classes).

    Returns:
        A `TrunkLoadResult`; its `summary()` is also logged.
    """
    if source is None or not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(f'load_trunk: source must be a timm model name, a checkpoint file or a state dict, '
                        f'got {"None" if source is None else type(source).__name__}')
    if isinstance(source, Mapping):
        src, _ = unwrap_state_dict(source)
        origin = 'the state dict'
    elif os.path.lexists(source):
        src, _ = read_state_dict(source)  # its errors say what is wrong with the path (a folder, a FIFO, ...)
        origin = str(source)
    else:
        import timm
        name = str(source)
        if not _is_timm_name(name):
            raise UserError(f'load_trunk: {name!r} is neither an existing file nor a timm model name')
        try:
            src = timm.create_model(name, pretrained=True).state_dict()
        except Exception as e:
            raise UserError(f'load_trunk: cannot load pretrained {name!r} ({type(e).__name__}: {e})') from None
        origin = name
    check_finite(src, f'load_trunk: {origin}')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier') or 'fc'
    first_conv = (cfg.get('first_conv') or 'conv1') + '.weight'
    target = model.state_dict()
    result = TrunkLoadResult()
    to_load = {}
    for k, v in src.items():
        if k not in target:
            result.skipped[k] = 'not in model'
        elif _is_attention_key(k):
            result.skipped[k] = 'attention (kept at init)'
        elif not load_classifier and k.startswith(classifier + '.'):
            result.skipped[k] = 'classifier'
        elif tuple(v.shape) == tuple(target[k].shape):
            to_load[k] = v
        elif k == first_conv and v.ndim == target[k].ndim == 4 and v.shape[1] != target[k].shape[1]:
            to_load[k], result.adapted[k] = _adapt_first_conv(k, v, target[k], origin)
        else:
            result.skipped[k] = 'shape mismatch'
    result.loaded = [k for k in target if k in to_load]
    result.missing = [k for k in target if k not in to_load]
    trunk = [k for k in target if not _is_attention_key(k) and not k.startswith(classifier + '.')]
    loaded_trunk = [k for k in trunk if k in to_load]
    if not [k for k in loaded_trunk if not k.endswith('.num_batches_tracked')]:  # counters fit any BatchNorm
        shown = ', '.join(list(src)[:3]) or 'none'
        raise UserError(f'load_trunk: no tensor of {origin} matches a trunk tensor of the model by name and shape '
                        f'({len(src)} source tensors, e.g. {shown}); is it a checkpoint of another architecture?')
    incompatible = model.load_state_dict(to_load, strict=False)
    assert not incompatible.unexpected_keys
    left = len(trunk) - len(loaded_trunk)
    if left:
        example = next(k for k in trunk if k not in to_load)
        _logger.warning(f'load_trunk from {origin}: partial load, {left} of {len(trunk)} trunk tensors left at init '
                        f'(e.g. {example}); {result.summary()}')
    else:
        _logger.info(f'load_trunk from {origin}: {result.summary()}')
    return result


def _is_timm_name(name: str) -> bool:
    """Whether `name` is a timm model name (`resnet50`, `resnet50.a1_in1k`, `hf-hub:...`)."""
    import timm
    return name.startswith(('hf-hub:', 'hf_hub:')) or timm.is_model(name)


# ---------------------------------------------------------------------------------------------------------------
# CLI: timm-layerattn convert
# ---------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._utils.args import int_arg
    parser.description = ('Convert a checkpoint of the official KCLA / MRLA / CNNtention code to this package\'s '
                          'layout (safetensors), checked strictly against the target architecture.')
    parser.add_argument('input', help='official checkpoint (torch file read with weights_only=True, or safetensors)')
    parser.add_argument('output', help='output .safetensors file')
    parser.add_argument('--model', required=True, help='target architecture, e.g. resnet50_kcla')
    parser.add_argument('--head-dim', type=int_arg(min=1), default=None,
                        help='KCLA head dim of the target (the official ImageNet code defaults to 64)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')


def run(args: argparse.Namespace) -> int:
    import safetensors.torch
    out = Path(args.output)
    if out.suffix != '.safetensors':
        raise UserError(f'output must be a .safetensors file, got {out}')
    if out.is_dir():
        raise UserError(f'output {out} is a folder; give the path of a .safetensors file')
    if os.path.lexists(out) and not args.overwrite:
        raise UserError(f'output file already exists: {out} (remove it or pass --overwrite)')
    if os.path.lexists(out) and not out.is_file():
        raise UserError(f'output {out} exists and is not a regular file; it is never replaced')
    from ._utils.files import check_writable
    check_writable(out.parent, 'output folder')
    state_dict, container = read_state_dict(args.input, prefer_ema=False)
    check_finite(state_dict, f'checkpoint {args.input}')
    converted, report = convert_official_with_report(state_dict, args.model, head_dim=args.head_dim)
    tensors = {k: v.contiguous() for k, v in converted.items()}
    with atomic_file(out) as f:
        f.write(safetensors.torch.save(tensors, metadata={'format': 'pt', 'architecture': report.model_name}))
    print(f'converted {report.summary()}')
    kwargs = f', head_dim={args.head_dim}' if args.head_dim else ''
    print(f"wrote {out}; load it with timm.create_model('{report.model_name}', pretrained=True{kwargs}, "
          f"pretrained_cfg_overlay=dict(file='{out}'))")
    return 0
