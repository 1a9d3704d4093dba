"""MMDetection 3.x plugin: importing this package registers `LayerAttnResNet` in mmdet's `MODELS` and the
`TimmTrunk` init type (timm's ImageNet ResNet weights into the trunk, `trunk.py`) in mmengine's
`WEIGHT_INITIALIZERS`.

Configs load it with `custom_imports = dict(imports=['timm_layerattn.det'], allow_failed_imports=False)`
(see the configs in `mmdet_configs/`, also installed with the package: `timm-layerattn det-configs`).
Importing it also lets mmengine read checkpoints saved by its Runner under torch >= 2.6 (`checkpoint.py`).
`smoke.py` (with the generated data of `tiny_coco.py`) is `timm-layerattn det-smoke`.

`import timm_layerattn` never imports this package. The MMDetection stack is the `mmdet` extra; mmcv
needs compiled ops, which the standalone installer `scripts/install_mmcv.py` (in a checkout and in the sdist)
builds once and caches when no official mmcv wheel matches the installed torch.
"""
_INSTALL_HINT = (
    'install the MMDetection stack with `python scripts/install_mmcv.py` from a timm-layerattn checkout or '
    'sdist (builds and caches mmcv for your torch if no official wheel exists), or '
    '`pip install "timm-layerattn[mmdet]"` where an mmcv wheel for your torch is available')

try:
    import mmdet.registry  # noqa: F401  (mmdet itself asserts a compatible mmcv version)
    import mmcv.ops  # noqa: F401  (detectors need the compiled ops: RoIAlign, NMS)
except (ImportError, AssertionError) as _err:
    raise ImportError(f'timm_layerattn.det needs MMDetection 3.3 with a compiled mmcv ({_err}); '
                      f'{_INSTALL_HINT}') from _err
else:
    from .backbone import LayerAttnResNet
    from .checkpoint import (WeightsNotFound, enable_mmengine_checkpoint_loading, mmengine_checkpoint_globals,
                             read_state_dict)
    from .smoke import run_smoke
    from .tiny_coco import make_tiny_coco
    from .trunk import TimmTrunkInit

    enable_mmengine_checkpoint_loading()

    __all__ = ['LayerAttnResNet', 'TimmTrunkInit', 'WeightsNotFound', 'enable_mmengine_checkpoint_loading',
               'make_tiny_coco', 'mmengine_checkpoint_globals', 'read_state_dict', 'run_smoke']
