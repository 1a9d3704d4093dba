"""Launchers: the runs one after another in this process, or as a submitit job array (SLURM, or submitit's
local executor), each job one run. Both print one progress line per run as it ends."""
import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..._utils.errors import UserError, first_line
from .runs import Run, Settings, execute

__all__ = ['RunJob', 'run_locally', 'run_submitit', 'SUBMITIT_CLUSTERS', 'result_line', 'duration']

SUBMITIT_CLUSTERS = ('slurm', 'local', 'debug')


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60:02d} s'
    return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


def result_line(result: Dict[str, Any]) -> str:
    """'top-1 72.31% (best 72.50%), 0.65M params, 2 min 03 s' for a result.json record."""
    final, best = result.get('final_top1'), result.get('best_top1')
    text = f'top-1 {final:.2f}%' if isinstance(final, (int, float)) else 'no evaluation'
    if isinstance(best, (int, float)):
        text += f' (best {best:.2f}%)'
    text += f', {result.get("num_params", 0) / 1e6:.2f}M params, {duration(result.get("wall_time_s", 0))}'
    return text + (' (resumed)' if result.get('resumed') else '')


def _error_line(e: BaseException) -> str:
    from ...cli import user_error_message
    message = user_error_message(e)
    return message if message is not None else f'{type(e).__name__}: {first_line(e)} (a bug; rerun with --debug)'


def run_locally(runs: Sequence[Run], settings: Settings, out_dir: Path, overwrite: bool, debug: bool = False,
                say: Callable[[str], None] = print) -> List[Run]:
    """Train `runs` one after another in this process; returns the runs that failed (the others went on)."""
    failed = []
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        tag = f'[{i}/{len(runs)}] {run.describe()}'
        say(f'{tag}: training {run.model} ...')
        try:
            result = execute(run, settings, str(out_dir), overwrite)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if debug:
                import traceback
                traceback.print_exc()
            say(f'{tag}: failed: {_error_line(e)}')
            failed.append(run)
            continue
        left = len(runs) - i
        eta = (time.perf_counter() - start) / i * left
        say(f'{tag}: {result_line(result)}' + (f'; {left} left, about {duration(eta)} to go' if left else ''))
    return failed


class RunJob:
    """`execute` as a submitit job that SLURM may time out or preempt: submitit then requeues it (up to three
    times), and the requeued job resumes the run from its last checkpoint (`execute` picks up where it stopped)."""

    def __call__(self, run: Run, settings: Settings, out_dir: str, overwrite: bool = False) -> Dict[str, Any]:
        return execute(run, settings, out_dir, overwrite)

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission  # in the job, where submitit runs us
        return DelayedSubmission(self, *args, **kwargs)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    from ..._utils.args import float_arg, int_arg
    g = parser.add_argument_group('submitit launcher (--launcher submitit; each run one job of a job array)')
    g.add_argument('--slurm-cluster', default='slurm', choices=SUBMITIT_CLUSTERS,
                   help='slurm (default); local = every job as a process on this machine, all at once; '
                        'debug = in this process')
    g.add_argument('--slurm-partition', default=None, help='SLURM partition')
    g.add_argument('--slurm-account', default=None, help='SLURM account')
    g.add_argument('--slurm-qos', default=None, help='SLURM quality of service')
    g.add_argument('--slurm-constraint', default=None, help='SLURM node constraint, e.g. a GPU type')
    g.add_argument('--slurm-time', type=int_arg(min=1), default=24 * 60, metavar='MIN',
                   help='time limit of one run, minutes (default: 1440)')
    g.add_argument('--slurm-gpus', type=int_arg(min=0), default=1, metavar='N', help='GPUs per run (default: 1)')
    g.add_argument('--slurm-cpus', type=int_arg(min=1), default=8, metavar='N',
                   help='CPU cores per run, for the data loaders (default: 8)')
    g.add_argument('--slurm-mem', type=float_arg(min=0, min_open=True), default=32, metavar='GB',
                   help='memory per run, GB (default: 32)')
    g.add_argument('--slurm-array-parallelism', type=int_arg(min=1), default=64, metavar='N',
                   help='runs at most this many jobs at once (default: 64)')
    g.add_argument('--no-wait', dest='wait', action='store_false',
                   help='submit and return; aggregate later with --collect')


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError('--launcher submitit needs submitit: pip install "timm-layerattn[slurm]"') from None
    return submitit


def check_submitit(args: argparse.Namespace) -> None:
    """Refuse the launcher before anything runs: submitit missing, or SLURM asked for where there is none."""
    _import_submitit()
    if args.slurm_cluster == 'slurm' and shutil.which('sbatch') is None:
        raise UserError('--launcher submitit: no SLURM on this machine (sbatch not found); use --slurm-cluster local '
                        'to run the jobs here, or --shard I/N under another scheduler')


def run_submitit(runs: Sequence[Run], settings: Settings, out_dir: Path, overwrite: bool, args: argparse.Namespace,
                 name: str, say: Callable[[str], None] = print) -> Optional[List[Run]]:
    """Submit `runs` as a job array; with `args.wait`, follow them and return the failed ones (else None)."""
    submitit = _import_submitit()
    executor = submitit.AutoExecutor(folder=str(out_dir / 'submitit' / '%j'), cluster=args.slurm_cluster)
    executor.update_parameters(
        name=name, timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus, cpus_per_task=args.slurm_cpus,
        mem_gb=args.slurm_mem, tasks_per_node=1, nodes=1, slurm_partition=args.slurm_partition,
        slurm_account=args.slurm_account, slurm_qos=args.slurm_qos, slurm_constraint=args.slurm_constraint,
        slurm_array_parallelism=args.slurm_array_parallelism)
    n = len(runs)
    jobs = executor.map_array(RunJob(), list(runs), [settings] * n, [str(out_dir)] * n, [overwrite] * n)
    by_job = {job.job_id: (i, run) for i, (job, run) in enumerate(zip(jobs, runs), 1)}
    say(f'submitted {n} job{"s" if n != 1 else ""} to {args.slurm_cluster} (ids {jobs[0].job_id}'
        + (f' ... {jobs[-1].job_id}' if n > 1 else '') + f'); logs in {out_dir / "submitit"}')
    if not args.wait:
        say('not waiting (--no-wait): when they have finished, the same command with --collect writes the results')
        return None
    failed = []
    for job in submitit.helpers.as_completed(jobs):
        i, run = by_job[job.job_id]
        tag = f'[{i}/{n}] {run.describe()}'
        try:
            say(f'{tag}: {result_line(job.result())} (job {job.job_id})')
        except Exception as e:  # the job's exception, with the job's traceback in its message
            lines = [line for line in str(e).splitlines() if line.strip()]
            say(f'{tag}: failed (job {job.job_id}): {lines[-1].strip() if lines else type(e).__name__}')
            failed.append(run)
    return failed
