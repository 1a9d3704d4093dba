"""ONNX export of a classifier or a `features_only` backbone, checked against onnxruntime before it is written.

* The graph is captured with `torch.onnx.export(..., dynamo=True)` (torch.export), with the batch, height and
  width of the input dynamic (named `batch`, `height`, `width` in the graph, as timm's own ONNX script names
  them). Every family exports this way (KCLA, MRLA light / base, attention shortcuts, CNNtention, GradAttn),
  classifier and feature backbone alike. The TorchScript exporter (`dynamo=False`) is not used: tracing bakes
  the example's spatial size into reshapes, so its graphs fail at another image size.
* The example input has batch 2 and the model's input size: torch.export specialises a dimension of size 1.
* The fused CPU kernels are off during the capture (`native.disabled()`): ONNX knows only the PyTorch path.
  Code that picks its ops by input size must not do so while exporting, or the graph holds the choice made
  at the example's size (`layers._common.depthwise_conv3x3` skips its CPU batch chunking then).
* Before anything is written, onnxruntime runs the graph at two shapes that differ from the example (batch 1
  at the model's input size; batch 2 at another, odd, height and width) and every output is compared with
  the PyTorch model's: the error relative to the output's largest magnitude must be at most `RTOL`, else a
  `UserError` and no file.

onnx, onnxscript (the exporter's graph builder) and onnxruntime are optional dependencies, imported only here.
"""
import dataclasses
import importlib
import logging
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._utils.errors import UserError, first_line
from .._utils.files import atomic_file

__all__ = ['ONNX_FILE', 'OPSET', 'RTOL', 'INPUT_NAME', 'INSTALL_HINT', 'OnnxCheck', 'OnnxExport', 'require_onnx',
           'check_shapes', 'export_onnx']

ONNX_FILE = 'model.onnx'
# Opset 18: run by onnxruntime >= 1.14 and TensorRT >= 8.6; the exporter's ops for these models all exist there.
OPSET = 18
# Largest |onnx - torch| allowed, relative to the largest |torch| of the output.
RTOL = 1e-4
INPUT_NAME = 'input0'
DYNAMIC_AXES = {0: 'batch', 2: 'height', 3: 'width'}
INSTALL_HINT = 'pip install onnx onnxruntime onnxscript'

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """One onnxruntime run compared with PyTorch: the input shape and the worst output's errors."""
    shape: Tuple[int, ...]
    max_abs_err: float
    max_rel_err: float


@dataclasses.dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured."""
    path: Path
    opset: int
    input_name: str
    output_names: List[str]
    checks: List[OnnxCheck]
    seconds: float
    features_only: bool = False
    optimized: bool = True  # onnxscript's graph optimizer ran (see `_capture`)
    feature_info: Optional[Dict[str, List[int]]] = None  # out_indices, channels, reductions of a backbone
    versions: Dict[str, str] = dataclasses.field(default_factory=dict)

    def record(self) -> Dict[str, Any]:
        """The entry `config.json` keeps about the file (and the model card shows)."""
        out: Dict[str, Any] = {
            'file': self.path.name, 'opset': self.opset, 'exporter': 'torch.onnx.export(dynamo=True)',
            'input': self.input_name, 'outputs': list(self.output_names),
            'dynamic_axes': {'batch': 0, 'height': 2, 'width': 3},
            'features_only': self.features_only, 'optimized': self.optimized,
            'checked': [dict(shape=list(c.shape), max_abs_err=float(f'{c.max_abs_err:.3g}'),
                             max_rel_err=float(f'{c.max_rel_err:.3g}')) for c in self.checks],
            'rtol': RTOL, 'versions': dict(self.versions),
        }
        if self.feature_info:
            out['feature_info'] = self.feature_info
        return out


def require_onnx() -> ModuleType:
    """onnxruntime, once onnx, onnxscript and onnxruntime are all importable; else one `UserError` naming them."""
    missing = []
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f'ONNX export needs {", ".join(missing)}, not installed: {INSTALL_HINT}')
    return importlib.import_module('onnxruntime')


def check_shapes(input_size: Sequence[int]) -> List[Tuple[int, ...]]:
    """The two input shapes a graph is checked at: batch 1 at `input_size`, batch 2 at another, odd, size."""
    c, h, w = (int(v) for v in input_size)
    return [(1, c, h, w), (2, c, h + h // 4 + 1, w + w // 2 - 1)]


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    if input_size is None:
        input_size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
        in_chans = getattr(model, 'in_chans', None)
        if in_chans:
            input_size = (in_chans, *tuple(input_size)[1:])
    if len(input_size) != 3 or not all(int(v) >= 1 for v in input_size):
        raise UserError(f'input_size must be (channels, height, width), got {tuple(input_size)}')
    return tuple(int(v) for v in input_size)  # type: ignore[return-value]


def _outputs(out: Any) -> List[torch.Tensor]:
    """A model's output as a list of tensors: the logits, or a backbone's feature maps."""
    items = list(out) if isinstance(out, (list, tuple)) else [out]
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise UserError('ONNX export takes models that return a tensor or a list of tensors '
                        f'(got {type(out).__name__})')
    return items


def _feature_info(model: nn.Module) -> Optional[Dict[str, List[int]]]:
    info = getattr(model, 'feature_info', None)
    if info is None or not hasattr(info, 'channels'):
        return None
    return {'out_indices': list(info.out_indices), 'channels': list(info.channels()),
            'reductions': list(info.reduction())}


def _capture(model: nn.Module, example: torch.Tensor, output_names: List[str], opset: int) -> Tuple[bytes, bool]:
    """The serialised ONNX graph of `model` (PyTorch path, eval mode, dynamic batch / height / width), and whether
    onnxscript's graph optimizer ran on it.

    The optimizer (constant folding, ...) is run separately: where it fails (its constant folding of a
    dynamic-size `SplitToSequence` does in resnet50_kcla, the batch chunking of the depth-wise convolutions),
    the unoptimised graph is kept. onnxruntime optimises a graph again when it loads it, and either graph is
    checked the same way.
    """
    from ..layers import native
    try:
        with native.disabled(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the exporter's notes on its own internals
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, dynamic_shapes=(dict(DYNAMIC_AXES),),
                input_names=[INPUT_NAME], output_names=output_names, opset_version=opset, external_data=False,
                verbose=False, optimize=False)
        graph = program.model_proto.SerializeToString()
    except UserError:
        raise
    except Exception as e:  # torch.export / translation failures come in many types
        raise UserError(f'ONNX export failed ({type(e).__name__}: {first_line(e)})') from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            program.optimize()
        return program.model_proto.SerializeToString(), True
    except Exception as e:  # the optimizer's pass errors; the graph it started from is complete
        _logger.info(f'ONNX graph optimizer failed ({type(e).__name__}: {first_line(e)}); keeping the graph as '
                     f'exported')
        return graph, False


def _compare(model: nn.Module, session: Any, shapes: Sequence[Tuple[int, ...]], rtol: float) -> List[OnnxCheck]:
    """Run the graph and the PyTorch model on the same random inputs; raise `UserError` past `rtol`."""
    gen = torch.Generator().manual_seed(0)
    checks = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            refs = _outputs(model(x))
        try:
            got = session.run(None, {INPUT_NAME: x.numpy()})
        except Exception as e:  # onnxruntime's own error types
            raise UserError(f'ONNX check failed: onnxruntime cannot run the graph at input shape {list(shape)} '
                            f'({first_line(e)})') from None
        if len(got) != len(refs):
            raise UserError(f'ONNX check failed: the graph gives {len(got)} outputs, the model {len(refs)}')
        worst_abs, worst_rel = 0.0, 0.0
        for i, (ref, out) in enumerate(zip(refs, got)):
            out = torch.from_numpy(out)
            if tuple(out.shape) != tuple(ref.shape):
                raise UserError(f'ONNX check failed at input shape {list(shape)}: output {i} has shape '
                                f'{list(out.shape)}, the model gives {list(ref.shape)}')
            err = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
            scale = float(ref.double().abs().max()) if ref.numel() else 0.0
            rel = err / scale if scale > 0 else (0.0 if err == 0 else float('inf'))
            if not (rel <= rtol):  # NaN fails too
                raise UserError(f'ONNX check failed at input shape {list(shape)}: output {i} differs from PyTorch '
                                f'by {err:.3g} (relative {rel:.3g} > {rtol:g})')
            worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
        checks.append(OnnxCheck(tuple(shape), worst_abs, worst_rel))
    return checks


def export_onnx(
        model: nn.Module,
        path: Union[str, Path],
        *,
        input_size: Optional[Sequence[int]] = None,
        opset: int = OPSET,
        rtol: float = RTOL,
        shapes: Optional[Sequence[Sequence[int]]] = None,
) -> OnnxExport:
    """Write `model` as an ONNX graph with dynamic batch, height and width, checked with onnxruntime first.

    Works for a classifier and for a backbone (`timm.create_model(name, features_only=True, out_indices=...)`,
    whose outputs are `output0`, `output1`, ...). The model is exported on the CPU in float32 and eval mode
    from a copy when it is elsewhere; its own state is left as it was.

    Args:
        model: The model; the input is named `input0`, the outputs `output0`, ...
        path: The `.onnx` file; written atomically, and only once the check passed.
        input_size: (channels, height, width) of the example and the first check (default: the model's
            `pretrained_cfg`).
        opset: ONNX opset of the graph.
        rtol: Largest error allowed relative to each output's largest magnitude.
        shapes: The input shapes checked (default: `check_shapes(input_size)`).

    Returns:
        What was written and measured (`OnnxExport.record()` is what `config.json` keeps).
    """
    ort = require_onnx()
    size = _input_size(model, input_size)
    param = next(model.parameters(), None)
    if param is not None and (param.device.type != 'cpu' or param.dtype != torch.float32):
        import copy
        model = copy.deepcopy(model).to(device='cpu', dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        example = torch.randn((2, *size), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            n_out = len(_outputs(model(example)))
        output_names = [f'output{i}' for i in range(n_out)]
        start = time.perf_counter()
        graph, optimized = _capture(model, example, output_names, opset)
        seconds = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            session = ort.InferenceSession(graph, sess_options=options, providers=['CPUExecutionProvider'])
        except Exception as e:
            raise UserError(f'ONNX check failed: onnxruntime cannot load the graph ({first_line(e)})') from None
        checks = _compare(model, session, [tuple(s) for s in (shapes or check_shapes(size))], rtol)
    finally:
        model.train(was_training)
    path = Path(path)
    with atomic_file(path) as f:
        f.write(graph)
    import onnx
    info = _feature_info(model)
    return OnnxExport(
        path=path, opset=opset, input_name=INPUT_NAME, output_names=output_names, checks=checks, seconds=seconds,
        features_only=info is not None, feature_info=info, optimized=optimized,
        versions={'torch': torch.__version__.split('+')[0], 'onnx': onnx.__version__, 'onnxruntime': ort.__version__})
