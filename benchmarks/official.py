"""Build the *official* KCLA / MRLA reference models from local checkouts of their repositories.

This module is a test/benchmark harness only. It contains no official code: it loads the model
files of a checkout that lives **outside** this repository and calls their builder functions.
Nothing is imported from the official repositories when this module is imported; they are only
touched inside :func:`load_official`.

Get the checkouts with, for example::

    git clone https://github.com/bgx666/KCLA /tmp/official/KCLA
    git clone https://github.com/joyfang1106/MRLA /tmp/official/MRLA

and pass their roots as ``kcla_repo`` / ``mrla_repo`` (or set ``KCLA_REPO`` / ``MRLA_REPO``; the
default is ``/tmp/official/KCLA`` and ``/tmp/official/MRLA``). The MRLA-B files need ``einops``
installed (only to run the official code; the project itself does not use it).

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
* CUDA: none of the files used here calls ``.cuda()`` at import, construction or forward (only
  DLA-L/DLA-B do, which this harness does not build), so no CUDA patch is needed; models are built
  on CPU.

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
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

__all__ = [
    'OfficialEntry', 'OFFICIAL_MODELS', 'IMAGENET_MODELS', 'CIFAR_MODELS', 'list_official',
    'load_official', 'official_repo', 'official_commit', 'DEFAULT_KCLA_REPO', 'DEFAULT_MRLA_REPO',
]

DEFAULT_KCLA_REPO = '/tmp/official/KCLA'
DEFAULT_MRLA_REPO = '/tmp/official/MRLA'


@dataclass(frozen=True)
class OfficialEntry:
    """Where one of our model names lives in the official code."""
    repo: str                   # 'kcla' (bgx666/KCLA) or 'mrla' (joyfang1106/MRLA)
    file: str                   # path of the model file inside the repository
    builder: str                # builder function in that file
    family: str                 # 'kcla' | 'mrlal' | 'mrlab' | 'resnet'
    kwargs: Dict[str, Any] = field(default_factory=dict)   # fixed builder kwargs
    default_kwargs: Dict[str, Any] = field(default_factory=dict)  # overridable defaults
    forward: str = ''           # where the per-block layer-attention forward lives (file:qualname)
    models_pkg: Optional[str] = None  # dir to expose as the stub package ``models`` while loading


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


def list_official() -> Tuple[str, ...]:
    return tuple(OFFICIAL_MODELS)


def official_repo(which: str, kcla_repo: Optional[str] = None, mrla_repo: Optional[str] = None) -> Path:
    """Root of the official checkout for ``which`` in {'kcla', 'mrla'} (argument > env var > default)."""
    if which == 'kcla':
        root = kcla_repo or os.environ.get('KCLA_REPO') or DEFAULT_KCLA_REPO
        url = 'https://github.com/bgx666/KCLA'
    elif which == 'mrla':
        root = mrla_repo or os.environ.get('MRLA_REPO') or DEFAULT_MRLA_REPO
        url = 'https://github.com/joyfang1106/MRLA'
    else:
        raise ValueError(f'unknown official repository {which!r}')
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f'official {which.upper()} checkout not found at {path}; clone {url} there '
            f'or pass {which}_repo=… / set {which.upper()}_REPO')
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
def _stub_models_package(pkg_dir: Optional[Path]) -> Iterator[None]:
    """Expose ``pkg_dir`` as the top-level package ``models`` without running its ``__init__.py``.

    Restores every ``models`` / ``models.*`` entry of ``sys.modules`` on exit.
    """
    if pkg_dir is None:
        yield
        return
    saved = {k: v for k, v in sys.modules.items() if k == 'models' or k.startswith('models.')}
    for k in saved:
        del sys.modules[k]
    stub = types.ModuleType('models')
    stub.__path__ = [str(pkg_dir)]  # package: submodules resolve under pkg_dir (namespace sub-packages)
    stub.__package__ = 'models'
    sys.modules['models'] = stub
    try:
        yield
    finally:
        for k in [k for k in sys.modules if k == 'models' or k.startswith('models.')]:
            del sys.modules[k]
        sys.modules.update(saved)


def _exec_file(path: Path, models_pkg: Optional[Path]) -> types.ModuleType:
    """Execute one official model file as a fresh private module (stdout swallowed)."""
    mod_name = f'_official_{re.sub(r"[^0-9a-zA-Z]", "_", path.stem)}_{next(_counter)}'
    spec = importlib.util.spec_from_file_location(mod_name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f'cannot load {path}')
    module = importlib.util.module_from_spec(spec)
    with _stub_models_package(models_pkg), contextlib.redirect_stdout(io.StringIO()):
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as e:
            if e.name == 'einops':
                raise ModuleNotFoundError(
                    f'{path.name} needs einops (only to run the official code): pip install einops') from e
            raise
    return module


def _patch_head_dim(module: types.ModuleType, entry: OfficialEntry, head_dim: int) -> None:
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


def load_official(name: str, kcla_repo: Optional[str] = None, mrla_repo: Optional[str] = None,
                  **kwargs: Any):
    """Build the official model for one of our model names (see module docstring).

    ``kwargs`` go to the official builder (e.g. ``num_classes``, ``drop_path``), except
    ``head_dim`` which is applied by the runtime patch described in the module docstring.
    The model is returned on CPU in training mode, exactly as the builder returns it.
    """
    try:
        entry = OFFICIAL_MODELS[name]
    except KeyError:
        raise ValueError(f'unknown official model {name!r}; known: {", ".join(OFFICIAL_MODELS)}') from None
    head_dim = kwargs.pop('head_dim', None)
    root = official_repo(entry.repo, kcla_repo, mrla_repo)
    path = root / entry.file
    if not path.is_file():
        raise FileNotFoundError(f'{path} missing from the official checkout')
    module = _exec_file(path, root / entry.models_pkg if entry.models_pkg else None)
    if head_dim is not None:
        _patch_head_dim(module, entry, int(head_dim))
    clash = set(kwargs) & set(entry.kwargs)
    if clash:
        raise ValueError(f'{name}: {sorted(clash)} are fixed by the model name')
    build_kwargs = {**entry.default_kwargs, **kwargs, **entry.kwargs}
    with contextlib.redirect_stdout(io.StringIO()):
        model = getattr(module, entry.builder)(**build_kwargs)
    return model
