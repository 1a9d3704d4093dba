"""One rank of the 2-process CPU run in test_det_dist.py (started by `python -m torch.distributed.run`).

Usage: _det_dist_worker.py CONFIG DATA_ROOT WORK_DIR
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def main(config: str, data_root: str, work_dir: str) -> None:
    from mmengine.config import Config
    from mmengine.runner import Runner

    from _det_utils import lighten, point_to_data

    # mmengine's pytorch launcher calls torch.cuda.set_device(LOCAL_RANK) before init_process_group, which
    # fails without a GPU; the Runner skips that step when the process group already exists.
    dist.init_process_group('gloo')
    cfg = Config.fromfile(config)
    point_to_data(cfg, Path(data_root), num_classes=2)
    lighten(cfg, iters=2, batch_size=1)
    cfg.model.backbone.init_cfg = None
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = None
    cfg.launcher = 'pytorch'
    cfg.env_cfg.dist_cfg = dict(backend='gloo')
    # CPU modules take no device_ids; mmengine's default DDP wrapper passes [LOCAL_RANK].
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.train()

    # Every rank must end with the same weights: DDP averaged the gradients of both ranks' batches.
    model = runner.model.module
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if dist.get_rank() == 0:
        result = dict(
            world_size=dist.get_world_size(),
            wrapper=type(runner.model).__name__,
            iters=runner.iter,
            losses=[float(v) for v in runner.message_hub.get_scalar('train/loss').data[0]],
            checksums=[float(c) for c in gathered],
        )
        Path(work_dir, 'result.json').write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(*sys.argv[1:4])
