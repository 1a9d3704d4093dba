"""Distributed training on PyTorch's own engine: torchrun, 2 CPU processes, gloo, DDP."""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', str(nproc),
           '--master_addr', '127.0.0.1', '--master_port', str(_free_port()), '-m', 'timm_layerattn.train', *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _checksum(state_dict) -> str:
    # Independent of the trainer's own helper: sha256 over name + raw bytes, sorted by name.
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        h.update(k.encode())
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_torchrun_two_cpu_ranks_stay_identical(tmp_path):
    out = tmp_path / 'ddp'
    # -b is per rank: 2 ranks x 8 = global batch 16, so the lr quoted for a batch of 8 doubles (timm's linear rule).
    res = _torchrun(2, ['--dataset', 'digits', '--model', 'cifar_resnet20', '--train-samples', '64',
                        '--val-samples', '30', '-b', '8', '--epochs', '2', '--opt', 'momentum', '--lr-base', '0.05',
                        '--lr-base-size', '8', '--sched', 'step', '--no-progress', '--workers', '0',
                        '--output', str(out)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert [line for line in lines if line.startswith('global batch')] == [  # once: rank 0 speaks
        'global batch 16 = 2 ranks x 8, lr 0.1 (linear scaling of base lr 0.05 @ 8; --no-lr-scale keeps 0.05)']
    assert [line.split('  ')[0] for line in lines if line.startswith('epoch ')] == ['epoch 0 (1 of 2)',
                                                                                   'epoch 1 (2 of 2)']
    log = json.loads((out / 'log.json').read_text())
    assert log['world_size'] == 2 and log['finished']
    assert log['updates_per_epoch'] == 4  # 64 images / 2 ranks / batch 8: each rank sees half the data
    assert [h['updates'] for h in log['epochs']] == [4, 8]
    # Every rank evaluated its shard; the sum covers the validation set exactly once.
    assert all(h['eval_count'] == 30 for h in log['epochs'])
    # Both ranks end with bit-identical parameters and buffers (BN statistics included) ...
    rank_sums = log['replica_checksums']
    assert len(rank_sums) == 2 and rank_sums[0] == rank_sums[1]
    # ... and that state is what rank 0 wrote to its checkpoint.
    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert _checksum(ckpt['state_dict']) == rank_sums[0]
    assert ckpt['args']['world_size'] == 2 and ckpt['args']['global_batch_size'] == 16
    # The optimizer ran at the scaled lr (the step schedule's base lr, before any decay).
    groups = ckpt['optimizer']['param_groups']
    assert [g['initial_lr'] for g in groups] == [0.1] * len(groups)


def test_torchrun_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    res = _torchrun(2, ['--dataset', 'digits', '--model', 'cifar_resnet20', '--sync-bn', '--epochs', '1',
                        '--no-progress', '--output', str(tmp_path / 'x')], timeout=120)
    assert res.returncode != 0
    assert '--sync-bn needs GPUs' in res.stderr
    assert not (tmp_path / 'x').exists()


def test_torchrun_layer_attention_model_trains_without_unused_parameters(tmp_path):
    """A KCLA net (carried history, re-summaries, drop path) trains through the memory-lean autograd Functions
    under DDP with find_unused_parameters=False: no reducer error, and the ranks stay bit-identical."""
    out = tmp_path / 'ddp_kcla'
    res = _torchrun(2, ['--dataset', 'digits', '--model', 'cifar_resnet20_kcla', '--train-samples', '32',
                        '--val-samples', '16', '-b', '4', '--epochs', '1', '--opt', 'momentum', '--lr-base', '0.05',
                        '--sched', 'step', '--drop-path', '0.1', '--no-progress', '--workers', '0',
                        '--output', str(out)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    log = json.loads((out / 'log.json').read_text())
    assert log['finished'] and log['world_size'] == 2
    rank_sums = log['replica_checksums']
    assert len(rank_sums) == 2 and rank_sums[0] == rank_sums[1]
