"""A 2-process distributed run (gloo on CPU, torchrun + mmengine's `pytorch` launcher) trains in step."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmcv.ops')

from _det_utils import CONFIG_DIR, make_coco  # noqa: E402

pytestmark = pytest.mark.det


def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    make_coco(tmp_path / 'data', num_images=4)
    worker = Path(__file__).with_name('_det_dist_worker.py')
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nnodes=1', '--nproc_per_node=2',
        str(worker), str(CONFIG_DIR / 'faster-rcnn_r50-kcla_fpn_1x_coco.py'), str(tmp_path / 'data'),
        str(tmp_path / 'work'),
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / 'work' / 'result.json').read_text())
    assert result['world_size'] == 2 and result['wrapper'] == 'MMDistributedDataParallel'
    assert result['iters'] == 2 and len(result['losses']) == 2
    assert all(math.isfinite(v) for v in result['losses'])
    a, b = result['checksums']
    assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), result['checksums']
