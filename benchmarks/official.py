"""Build the *official* KCLA / MRLA reference models from local checkouts of their repositories.

This module is a test/benchmark harness only. It contains no official code: it loads the model
files of a checkout that lives **outside** this repository and calls their builder functions.
Nothing is imported from the official repositories when this module is imported; they are only
touched inside :func:`load_official`.

Get the checkouts with, for example::

    git clone https://github.com/bgx666/KCLA /tmp/official/KCLA
    git clone https://github.com/joyfang1106/MRLA /tmp/official/MRLA
    git -C /tmp/official/MRLA worktree add /tmp/official/MRLA-2915aff 2915aff^

and pass their roots as ``kcla_repo`` / ``mrla_repo`` / ``mrla_2915aff_repo`` (or set ``KCLA_REPO`` /
``MRLA_REPO`` / ``MRLA_2915AFF_REPO``; the defaults are ``/tmp/official/KCLA``, ``/tmp/official/MRLA`` and
``/tmp/official/MRLA-2915aff``). The third is joyfang1106/MRLA at the parent of commit 2915aff, which removed
the EfficientNet-MRLA files (a fork of timm 0.4.9's ``timm/models``) from the tree; only the EfficientNet
entries need it. The MRLA-B files (ResNet and DeiT) need ``einops`` installed (only to run the official
code; the project itself does not use it).

Names (ours -> official file : builder; ``docs/design/layer_attention.md#la-kcla`` and the MRLA sections after it):

================================  ===============================================================
``resnet{50,101}_kcla``           bgx666/KCLA ``imagenet/kcla_resnet.py`` : ``resnet{50,101}_kcla``
``resnet{50,101}_mrlal``          joyfang1106/MRLA ``resnet/models/resnet_mrla_light.py`` : ``resnet{50,101}_mrlal``
``resnet{50,101}_mrlab``          joyfang1106/MRLA ``resnet/models/resnet_mrla_base.py`` : ``resnet{50,101}_mrlab``
``cifar_resnet{20,56,110}``       bgx666/KCLA ``cifar/models/cifar/resnet.py`` : ``resnet``
``cifar_resnet{20,56,110}_kcla``  bgx666/KCLA ``cifar/models/cifar/KCLA.py`` : ``kcla``
``cifar_resnet{20,56,110}_mrlal`` bgx666/KCLA ``cifar/models/cifar/mrla_light.py`` : ``mrla_light``
``cifar_resnet{20,56,110}_mrlab`` bgx666/KCLA ``cifar/models/cifar/mrla_base.py`` : ``mrla_base``
================================  ===============================================================

Vision transformers and EfficientNets (:data:`OFFICIAL_TRUNK_MODELS`; kept apart from
:data:`OFFICIAL_MODELS`, whose consumers expect ResNets):

* ``deit_{tiny,small,base}_patch16_224_mrlal``: joyfang1106/MRLA ``deit/deit_mrla_light.py`` :
  ``deit_mrlal_{tiny,small,base}_patch16_224``
* ``deit_{tiny,small,base}_patch16_224_mrlab``: joyfang1106/MRLA ``deit/deit_mrla_base.py`` :
  ``deit_mrlab_{tiny,small,base}_patch16_224``
* ``efficientnet_b{0,1,2}_mrlal``: joyfang1106/MRLA at ``2915aff^``, ``timm/models/efficientnet_mrla.py`` :
  ``efficientnet_mrla_b{0,1,2}``

The papers' baselines (:data:`OFFICIAL_BASELINE_MODELS`; ``dla`` / ``rla`` are the checkouts of
tunantu/Dynamic-Layer-Attention and joyfang1106/RLANet, ``DLA_REPO`` / ``RLA_REPO``, defaults
``/tmp/official/Dynamic-Layer-Attention`` and ``/tmp/official/RLANet``):

* ``cifar_resnet{20,56,110}_{se,eca,dia,dynlal,dynlab,la,linla}``: bgx666/KCLA ``cifar/models/cifar/`` ``senet.py`` :
  ``senet``, ``ecanet.py`` : ``ecanet``, ``dia_resnet.py`` : ``dia_resnet``, ``dla_l.py`` : ``dla_l``, ``dla_b.py`` :
  ``dla_b``, ``layer_attention.py`` : ``layer_attention``, ``linear_attention.py`` : ``linear_attention``
* ``resnet{50,101}_dynlal``: tunantu/Dynamic-Layer-Attention ``image_classification/imagenet/models/resnet_dla_l.py``
  : ``resnet{50,101}_dla_l`` (its ``from models.modules…`` imports resolve through the stub package ``models``)
* ``resnet{50,101}_rla``: joyfang1106/RLANet ``models/resnet_rla.py`` : ``rla_resnet{50,101}`` (package-relative
  imports: executed as a submodule of a stub package whose ``__path__`` is ``models/``, so its ``__init__.py``,
  which imports every variant, never runs)
* ``resnet50_la``: joyfang1106/MRLA ``resnet/models/resnet_la_eq4.py`` : ``resnet50_la_eq4`` (the paper's eq. 4)

The DIANet and DLA files call ``.cuda()`` on fresh LSTM states inside ``forward``; their models are returned with
``forward`` wrapped so that ``Tensor.cuda`` returns the tensor itself during the call (the official maths is
untouched; the wrapper costs one attribute swap per call). ``dla_b.py``, ``layer_attention.py`` and
``linear_attention.py`` need ``einops``.

CIFAR models are always built with ``block_name='Bottleneck'`` and ``depth`` from the name
(9n+2) and default to ``num_classes=10`` (the official constructor's default is 1000).

How the official code is made to run (see the quirks ``docs/design/layer_attention.md#la-no-official-imports``
and ``#la-no-prints``):

* Files are executed directly with :mod:`importlib` (``spec_from_file_location``), never through
  their package ``__init__``: joyfang1106/MRLA's ``resnet/models/__init__.py`` star-imports names that
  do not exist (``#la-no-official-imports``). The MRLA ImageNet files do
  ``from models.modules.… import …``; for the duration of the load a stub package ``models`` whose
  ``__path__`` is ``resnet/models`` is put in ``sys.modules`` (so ``__init__.py`` is never run and the
  submodules resolve to the checkout's files), and every ``models``/``models.*`` entry is restored/removed afterwards.
* Every call loads a *fresh* copy of the file, so the runtime patches below never leak between
  models.
* The constructor prints ("Constructing …", ``#la-no-prints``) are swallowed (stdout redirected during load
  and build).
* CUDA: none of the KCLA / MRLA / DeiT / EfficientNet files calls ``.cuda()`` at import, construction or forward
  (DIANet and DLA do, see the baselines below), so no CUDA patch is needed for them; models are built
  on CPU.
* DeiT (``deit/deit_mrla_{light,base}.py``, written against timm 0.3.2): the files import the plain modules
  ``helpers`` and ``weight_init`` from their own folder, and ``timm.models.layers.helpers``,
  ``timm.models.registry``. For the duration of the load, ``helpers`` / ``weight_init`` are the checkout's files
  (executed fresh), ``timm.models.layers.helpers`` is a shim holding ``to_2tuple`` from ``timm.layers``
  (timm 1.0 has no such module), and ``timm.models.registry`` is a shim whose ``register_model`` returns the
  builder unchanged, so the official names never enter timm's registry (the builders are called directly).
  Every ``sys.modules`` entry touched is restored afterwards.
* EfficientNet (the timm 0.4.9 fork at ``2915aff^``): ``efficientnet_mrla.py`` is executed as a submodule of a
  fresh stub package whose ``__path__`` is the fork's ``timm/models``, so its package-relative imports
  (``.efficientnet_blocks``, ``.efficientnet_builder``) load the fork's own files. The fork holds only those
  three files; the other relative imports resolve to these shims, each used only where the fork has no such
  file:

  - ``.layers``, ``.layers.activations``, ``.layers.drop``: timm 1.0's ``timm.layers`` modules themselves
    (``create_conv2d``, ``drop_path``, ``DropPath``, ``make_divisible``, ``sigmoid``, ``get_act_layer``,
    ``CondConv2d``, ``get_condconv_initializer``, ``create_classifier``: same names, same signatures);
  - ``.features``: ``timm.models._features`` (``FeatureInfo``, ``FeatureHooks``; imported, never used to build);
  - ``.registry``: ``register_model`` returning the builder unchanged (as for DeiT);
  - ``.helpers``: ``build_model_with_cfg`` with timm 0.4.9's signature (``default_cfg=``, ``kwargs_filter=``),
    which calls the model class with the remaining keywords and sets ``default_cfg`` (what 0.4.9 does without
    pretrained weights or ``features_only``; ``pretrained=True`` raises), and ``default_cfg_for_features``
    (imported, never called).

  The stub package and everything loaded under it are removed from ``sys.modules`` afterwards.

``head_dim`` (optional keyword, applies to every family; ``None`` = the code default: KCLA
ImageNet 64, KCLA CIFAR 16, MRLA-L ImageNet 32, MRLA-L/MRLA-B CIFAR 16, MRLA-B ImageNet 16):

* KCLA: the ImageNet ``ResNet`` builds its cells through the module-global ``kcla_layer``
  (``self.layer_attention = kcla_layer``; CIFAR's ``Bottleneck`` calls ``kcla_layer`` directly),
  always with ``heads=None``, which the cell maps to its hard-coded ``head = 64`` (16 on CIFAR).
  The patch replaces that module global, in the freshly loaded copy only, by a wrapper that turns
  ``heads=None`` into ``heads = in_channel // head_dim``; the cell then sets
  ``head = in_channel // heads = head_dim`` itself. Everything else (``u_channel = C/2``, the
  ``adjust_channel`` groups = heads, ``norm_d`` for ``heads`` heads) follows from the official code.
  ``head_dim=32`` is the paper's setting (``docs/design/layer_attention.md#la-kcla-head-dim``; the
  ``#la-params-imagenet`` counts for d = 32 come from the builder patched this way).
* MRLA-L / MRLA-B: the class attribute ``mrla_module.dim_perhead`` of the fresh copy is set.
* The DeiT and EfficientNet builders fix their head sizes (``dim_mrla=16``; 8 heads per EfficientNet cell):
  ``head_dim`` is refused for them.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import itertools
import os
import re
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

__all__ = [
    'OfficialEntry', 'OFFICIAL_MODELS', 'OFFICIAL_TRUNK_MODELS', 'IMAGENET_MODELS', 'CIFAR_MODELS', 'list_official',
    'OFFICIAL_BASELINE_MODELS', 'load_official', 'official_entry', 'official_repo', 'official_commit',
    'DEFAULT_KCLA_REPO', 'DEFAULT_MRLA_REPO', 'DEFAULT_MRLA_2915AFF_REPO', 'DEFAULT_DLA_REPO', 'DEFAULT_RLA_REPO',
]

DEFAULT_KCLA_REPO = '/tmp/official/KCLA'
DEFAULT_MRLA_REPO = '/tmp/official/MRLA'
DEFAULT_MRLA_2915AFF_REPO = '/tmp/official/MRLA-2915aff'
DEFAULT_DLA_REPO = '/tmp/official/Dynamic-Layer-Attention'
DEFAULT_RLA_REPO = '/tmp/official/RLANet'


@dataclass(frozen=True)
class OfficialEntry:
    """Where one of our model names lives in the official code."""
    repo: str                   # 'kcla' (bgx666/KCLA), 'mrla' (joyfang1106/MRLA), 'mrla_2915aff' (MRLA at 2915aff^),
                                # 'dla' (tunantu/Dynamic-Layer-Attention) or 'rla' (joyfang1106/RLANet)
    file: str                   # path of the model file inside the repository
    builder: str                # builder function in that file
    family: str                 # 'kcla' | 'mrlal' | 'mrlab' | 'resnet'
    kwargs: Dict[str, Any] = field(default_factory=dict)   # fixed builder kwargs
    default_kwargs: Dict[str, Any] = field(default_factory=dict)  # overridable defaults
    forward: str = ''           # where the per-block layer-attention forward lives (file:qualname)
    models_pkg: Optional[str] = None  # dir to expose as the stub package ``models`` (file) / the fork (timm049_fork)
    # how the file is made to import (module docstring): 'file' (ResNet / CIFAR files), 'timm032' (the DeiT files:
    # sibling modules, timm 0.3.2 import paths), 'timm049_fork' (a file of the timm 0.4.9 fork, under a stub package),
    # 'package' (a file with package-relative imports of its own folder, under a stub package)
    loader: str = 'file'
    siblings: Tuple[str, ...] = ()  # plain top-level modules the file imports from its own folder ('timm032')
    cuda_in_forward: bool = False  # the forward calls ``.cuda()``: wrapped so that it runs on CPU (docstring)
    # kwargs of our model that reproduce this official model's batched outputs where our default departs from them
    parity_kwargs: Dict[str, Any] = field(default_factory=dict)


def _build_table() -> Dict[str, OfficialEntry]:
    table: Dict[str, OfficialEntry] = {}
    for depth in (50, 101):
        table[f'resnet{depth}_kcla'] = OfficialEntry(
            'kcla', 'imagenet/kcla_resnet.py', f'resnet{depth}_kcla', 'kcla',
            forward='imagenet/kcla_resnet.py:kcla_layer.forward (stage loop: Attention.forward, '
                    'trunk: Bottleneck.forward, model: ResNet.forward_features)')
        table[f'resnet{depth}_mrlal'] = OfficialEntry(
            'mrla', 'resnet/models/resnet_mrla_light.py', f'resnet{depth}_mrlal', 'mrlal',
            forward='resnet/models/modules/mrla_light_module.py:mrla_light_layer.forward '
                    '(+ resnet/models/resnet_mrla_light.py:mrla_module.forward, MRLA_Bottleneck.forward)',
            models_pkg='resnet/models')
        table[f'resnet{depth}_mrlab'] = OfficialEntry(
            'mrla', 'resnet/models/resnet_mrla_base.py', f'resnet{depth}_mrlab', 'mrlab',
            forward='resnet/models/modules/mrla_base_module.py:mrla_base_layer.forward '
                    '(+ resnet/models/resnet_mrla_base.py:mrla_module.forward, MRLA_Bottleneck.forward, '
                    'ResNet_mrlab.forward_features)',
            models_pkg='resnet/models')
    cifar = 'cifar/models/cifar/'
    for depth in (20, 56, 110):
        fixed = dict(depth=depth, block_name='Bottleneck')
        dflt = dict(num_classes=10)
        table[f'cifar_resnet{depth}'] = OfficialEntry(
            'kcla', cifar + 'resnet.py', 'resnet', 'resnet', fixed, dflt,
            forward=cifar + 'resnet.py:Bottleneck.forward, ResNet.forward')
        table[f'cifar_resnet{depth}_kcla'] = OfficialEntry(
            'kcla', cifar + 'KCLA.py', 'kcla', 'kcla', fixed, dflt,
            forward=cifar + 'KCLA.py:kcla_layer.forward (+ Bottleneck.forward, ResNet.forward_features)')
        table[f'cifar_resnet{depth}_mrlal'] = OfficialEntry(
            'kcla', cifar + 'mrla_light.py', 'mrla_light', 'mrlal', fixed, dflt,
            forward=cifar + 'mrla_light.py:mrla_light_layer.forward (+ mrla_module.forward, Bottleneck.forward)')
        table[f'cifar_resnet{depth}_mrlab'] = OfficialEntry(
            'kcla', cifar + 'mrla_base.py', 'mrla_base', 'mrlab', fixed, dflt,
            forward=cifar + 'mrla_base.py:mrla_base_layer.forward (+ mrla_module.forward, Bottleneck.forward, '
                            'ResNet.forward_features)')
    return table


OFFICIAL_MODELS: Dict[str, OfficialEntry] = _build_table()
IMAGENET_MODELS = tuple(n for n in OFFICIAL_MODELS if not n.startswith('cifar_'))
CIFAR_MODELS = tuple(n for n in OFFICIAL_MODELS if n.startswith('cifar_'))


def _build_trunk_table() -> Dict[str, OfficialEntry]:
    table: Dict[str, OfficialEntry] = {}
    deit = {
        'mrlal': ('deit/deit_mrla_light.py', 'mrlal_module.forward (+ mrlal_layer.forward, Block.forward)'),
        'mrlab': ('deit/deit_mrla_base.py', 'mrlab_module.forward (+ mrlab_layer.forward, Block.forward, '
                                            'ViT_mrlab.forward_features)'),
    }
    for size in ('tiny', 'small', 'base'):
        for family, (file, fwd) in deit.items():
            table[f'deit_{size}_patch16_224_{family}'] = OfficialEntry(
                'mrla', file, f'deit_{family}_{size}_patch16_224', family, forward=f'{file}:{fwd}',
                loader='timm032', siblings=('helpers', 'weight_init'))
    fork = 'timm/models/'
    for b in (0, 1, 2):
        table[f'efficientnet_b{b}_mrlal'] = OfficialEntry(
            'mrla_2915aff', fork + 'efficientnet_mrla.py', f'efficientnet_mrla_b{b}', 'mrlal',
            forward=fork + 'efficientnet_blocks.py:mrla_module.forward (+ mla_layer.forward, '
                           'InvertedResidual_MRLA.forward)',
            models_pkg=fork, loader='timm049_fork')
    return table


OFFICIAL_TRUNK_MODELS: Dict[str, OfficialEntry] = _build_trunk_table()


# DLA's gate step reads the batch's first sample's state for every sample; ours is per sample unless asked
# (docs/design/dynamic_layer_attention.md#dyn-batch-coupling), so the batched comparison builds ours coupled.
_DLA_PARITY = {'batch_coupled_gate': True}


def _build_baseline_table() -> Dict[str, OfficialEntry]:
    table: Dict[str, OfficialEntry] = {}
    cifar = 'cifar/models/cifar/'
    # ours suffix -> (file, builder, family, forward calls .cuda())
    kcla_repo = {
        'se': ('senet.py', 'senet', 'se', False), 'eca': ('ecanet.py', 'ecanet', 'eca', False),
        'dia': ('dia_resnet.py', 'dia_resnet', 'dia', True), 'dynlal': ('dla_l.py', 'dla_l', 'dynlal', True),
        'dynlab': ('dla_b.py', 'dla_b', 'dynlab', True),
        'la': ('layer_attention.py', 'layer_attention', 'la', False),
        'linla': ('linear_attention.py', 'linear_attention', 'linla', False),
    }
    for depth in (20, 56, 110):
        for suffix, (file, builder, family, cuda) in kcla_repo.items():
            table[f'cifar_resnet{depth}_{suffix}'] = OfficialEntry(
                'kcla', cifar + file, builder, family, dict(depth=depth, block_name='Bottleneck'),
                dict(num_classes=10), cuda_in_forward=cuda,
                parity_kwargs=_DLA_PARITY if family.startswith('dyn') else {})
    for depth in (50, 101):
        table[f'resnet{depth}_dynlal'] = OfficialEntry(
            'dla', 'image_classification/imagenet/models/resnet_dla_l.py', f'resnet{depth}_dla_l', 'dynlal',
            models_pkg='image_classification/imagenet/models', cuda_in_forward=True, parity_kwargs=_DLA_PARITY)
        table[f'resnet{depth}_rla'] = OfficialEntry(
            'rla', 'models/resnet_rla.py', f'rla_resnet{depth}', 'rla', loader='package')
    table['resnet50_la'] = OfficialEntry(
        'mrla', 'resnet/models/resnet_la_eq4.py', 'resnet50_la_eq4', 'la', models_pkg='resnet/models')
    return table


# The baselines of the layer-attention papers (SE, ECA, DIANet, DLA-L / DLA-B, full / linear layer attention,
# RLA-Net); kept apart as the trunks are, since the parity and reference tools above know only KCLA / MRLA.
OFFICIAL_BASELINE_MODELS: Dict[str, OfficialEntry] = _build_baseline_table()


def list_official() -> Tuple[str, ...]:
    """Every name :func:`load_official` builds (ResNets first, then the ViT / EfficientNet trunks, then the
    baselines)."""
    return tuple(OFFICIAL_MODELS) + tuple(OFFICIAL_TRUNK_MODELS) + tuple(OFFICIAL_BASELINE_MODELS)


def official_entry(name: str) -> OfficialEntry:
    entry = OFFICIAL_MODELS.get(name) or OFFICIAL_TRUNK_MODELS.get(name) or OFFICIAL_BASELINE_MODELS.get(name)
    if entry is None:
        raise ValueError(f'unknown official model {name!r}; known: {", ".join(list_official())}')
    return entry


_REPOS = {  # which -> (env var, default root, how to get it)
    'kcla': ('KCLA_REPO', DEFAULT_KCLA_REPO, 'clone https://github.com/bgx666/KCLA there'),
    'mrla': ('MRLA_REPO', DEFAULT_MRLA_REPO, 'clone https://github.com/joyfang1106/MRLA there'),
    'mrla_2915aff': ('MRLA_2915AFF_REPO', DEFAULT_MRLA_2915AFF_REPO,
                     'make it from a joyfang1106/MRLA clone: git -C <clone> worktree add <path> 2915aff^'),
    'dla': ('DLA_REPO', DEFAULT_DLA_REPO, 'clone https://github.com/tunantu/Dynamic-Layer-Attention there'),
    'rla': ('RLA_REPO', DEFAULT_RLA_REPO, 'clone https://github.com/joyfang1106/RLANet there'),
}


def official_repo(which: str, kcla_repo: Optional[str] = None, mrla_repo: Optional[str] = None,
                  mrla_2915aff_repo: Optional[str] = None, dla_repo: Optional[str] = None,
                  rla_repo: Optional[str] = None) -> Path:
    """Root of the official checkout ``which`` ('kcla', 'mrla', 'mrla_2915aff', 'dla', 'rla'): argument > env var >
    default."""
    if which not in _REPOS:
        raise ValueError(f'unknown official repository {which!r}')
    env, default, how = _REPOS[which]
    given = {'kcla': kcla_repo, 'mrla': mrla_repo, 'mrla_2915aff': mrla_2915aff_repo, 'dla': dla_repo,
             'rla': rla_repo}[which]
    path = Path(given or os.environ.get(env) or default).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f'official {which.upper()} checkout not found at {path}; {how} '
            f'or pass {which}_repo=… / set {env}')
    return path


def official_commit(path: Path) -> Optional[str]:
    """HEAD commit of a checkout (None when it is not a git work tree)."""
    try:
        out = subprocess.run(['git', '-C', str(path), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r'[0-9a-f]{40}', sha) else None


_counter = itertools.count()


@contextlib.contextmanager
def _temporary_modules(modules: Mapping[str, types.ModuleType]) -> Iterator[None]:
    """Put ``modules`` into ``sys.modules`` for the duration of the block.

    On exit every entry named in ``modules``, or below one of them (``name.…``: whatever got imported through
    them), is removed, and the entries that were there before are restored.
    """
    roots = tuple(modules)

    def owned(key: str) -> bool:
        return any(key == r or key.startswith(r + '.') for r in roots)

    saved = {k: v for k, v in sys.modules.items() if owned(k)}
    for k in saved:
        del sys.modules[k]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k in [k for k in sys.modules if owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _package(name: str, path: Path) -> types.ModuleType:
    """A package object whose submodules resolve under ``path`` (its ``__init__.py``, if any, never runs)."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(path)]
    pkg.__package__ = name
    return pkg


def _shim(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name, 'import shim of benchmarks/official.py (see its module docstring)')
    module.__dict__.update(attrs)
    return module


def _keep_unregistered(fn):
    """``register_model`` of the shims: the builder is called directly, timm's registry is left alone."""
    return fn


def _timm032_shims() -> Dict[str, types.ModuleType]:
    """timm 0.3.2 import paths of the DeiT files that timm 1.0 lacks or that would register the official names."""
    from timm.layers import to_2tuple
    return {'timm.models.layers.helpers': _shim('timm.models.layers.helpers', to_2tuple=to_2tuple),
            'timm.models.registry': _shim('timm.models.registry', register_model=_keep_unregistered)}


def _fork_build_model_with_cfg(model_cls, variant, pretrained, default_cfg=None, pretrained_strict=True,
                               kwargs_filter=None, **kwargs):
    """timm 0.4.9's ``build_model_with_cfg`` for a model without pretrained weights or ``features_only``."""
    if pretrained:
        raise ValueError(f'{variant}: the official EfficientNet-MRLA published no weights; use pretrained=False')
    if kwargs.get('features_only'):
        raise ValueError(f'{variant}: features_only is not supported by the import shim')
    model = model_cls(**kwargs)
    model.default_cfg = copy.deepcopy(default_cfg)
    return model


def _fork_default_cfg_for_features(default_cfg):
    raise NotImplementedError('default_cfg_for_features: features_only is not supported by the import shim')


def _timm049_fork_shims(pkg: str, pkg_dir: Path) -> Dict[str, types.ModuleType]:
    """Relative imports of the timm 0.4.9 fork that the checkout does not hold, mapped onto timm 1.0."""
    import timm.layers
    import timm.layers.activations
    import timm.layers.drop
    import timm.models._features
    shims = {
        'layers': timm.layers,
        'layers.activations': timm.layers.activations,
        'layers.drop': timm.layers.drop,
        'features': timm.models._features,
        'registry': _shim(f'{pkg}.registry', register_model=_keep_unregistered),
        'helpers': _shim(f'{pkg}.helpers', build_model_with_cfg=_fork_build_model_with_cfg,
                         default_cfg_for_features=_fork_default_cfg_for_features),
    }
    held = lambda rel: (pkg_dir / f'{rel}.py').is_file() or (pkg_dir / rel).is_dir()  # noqa: E731
    return {f'{pkg}.{rel}': m for rel, m in shims.items() if not held(rel.split('.')[0])}


def _exec_sibling(path: Path, name: str) -> types.ModuleType:
    """A fresh copy of a plain module beside an official file (the DeiT files' ``helpers``, ``weight_init``)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f'cannot load {path}')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exec_file(path: Path, entry: OfficialEntry, root: Path) -> types.ModuleType:
    """Execute one official model file as a fresh private module (stdout swallowed)."""
    uid = next(_counter)
    stem = re.sub(r'[^0-9a-zA-Z]', '_', path.stem)
    modules: Dict[str, types.ModuleType] = {}
    if entry.loader == 'file':
        mod_name = f'_official_{stem}_{uid}'
        if entry.models_pkg:
            modules['models'] = _package('models', root / entry.models_pkg)
    elif entry.loader == 'timm032':
        mod_name = f'_official_{stem}_{uid}'
        modules.update(_timm032_shims())
        modules.update({s: _exec_sibling(path.parent / f'{s}.py', s) for s in entry.siblings})
    elif entry.loader == 'package':
        pkg = f'_official_pkg_{uid}'
        modules[pkg] = _package(pkg, path.parent)
        mod_name = f'{pkg}.{path.stem}'
    elif entry.loader == 'timm049_fork':
        pkg_dir = root / (entry.models_pkg or path.parent.relative_to(root))
        pkg = f'_official_timm_fork_{uid}'
        modules[pkg] = _package(pkg, pkg_dir)
        modules.update(_timm049_fork_shims(pkg, pkg_dir))
        mod_name = f'{pkg}.{path.stem}'
    else:
        raise ValueError(f'unknown loader {entry.loader!r}')
    spec = importlib.util.spec_from_file_location(mod_name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f'cannot load {path}')
    module = importlib.util.module_from_spec(spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_temporary_modules(modules))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter('ignore', FutureWarning)  # timm's notes on the deprecated import paths
        warnings.simplefilter('ignore', DeprecationWarning)
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as e:
            if e.name == 'einops':
                raise ModuleNotFoundError(
                    f'{path.name} needs einops (only to run the official code): pip install einops') from e
            raise
    return module


def _patch_head_dim(module: types.ModuleType, entry: OfficialEntry, head_dim: int) -> None:
    if entry.loader != 'file':
        raise ValueError(f'head_dim: the official builder {entry.builder!r} fixes its head size')
    if entry.family == 'kcla':
        orig = module.kcla_layer

        def kcla_layer_fixed_head_dim(in_channel, u_channel, heads=None, *args, **kwargs):
            if heads is None:
                if in_channel % head_dim:
                    raise ValueError(f'head_dim {head_dim} does not divide {in_channel} channels')
                heads = in_channel // head_dim
            return orig(in_channel, u_channel, heads, *args, **kwargs)

        module.kcla_layer = kcla_layer_fixed_head_dim
    elif entry.family in ('mrlal', 'mrlab'):
        module.mrla_module.dim_perhead = head_dim
    else:
        raise ValueError(f'head_dim is meaningless for the plain ResNet {entry.builder!r}')


class _CudaFreeForward:
    """Makes ``Tensor.cuda()`` return the tensor itself for the duration of a call (the DIANet / DLA forwards move
    their fresh LSTM states with ``.cuda()``; everything else is already where the input is)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        import torch
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return self.forward(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda


def load_official(name: str, kcla_repo: Optional[str] = None, mrla_repo: Optional[str] = None,
                  mrla_2915aff_repo: Optional[str] = None, dla_repo: Optional[str] = None,
                  rla_repo: Optional[str] = None, **kwargs: Any):
    """Build the official model for one of our model names (see module docstring).

    ``kwargs`` go to the official builder (e.g. ``num_classes``, ``drop_path``), except
    ``head_dim`` which is applied by the runtime patch described in the module docstring.
    The model is returned on CPU in training mode, exactly as the builder returns it.
    """
    entry = official_entry(name)
    head_dim = kwargs.pop('head_dim', None)
    root = official_repo(entry.repo, kcla_repo, mrla_repo, mrla_2915aff_repo, dla_repo, rla_repo)
    path = root / entry.file
    if not path.is_file():
        hint = ' (it is the checkout of 2915aff^, not of HEAD?)' if entry.repo == 'mrla_2915aff' else ''
        raise FileNotFoundError(f'{path} missing from the official checkout{hint}')
    module = _exec_file(path, entry, root)
    if head_dim is not None:
        _patch_head_dim(module, entry, int(head_dim))
    clash = set(kwargs) & set(entry.kwargs)
    if clash:
        raise ValueError(f'{name}: {sorted(clash)} are fixed by the model name')
    build_kwargs = {**entry.default_kwargs, **kwargs, **entry.kwargs}
    with contextlib.redirect_stdout(io.StringIO()):
        model = getattr(module, entry.builder)(**build_kwargs)
    if entry.cuda_in_forward:
        model.forward = _CudaFreeForward(model.forward)  # an instance attribute: nn.Module.__call__ uses it
    return model
