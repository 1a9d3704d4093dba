"""`timm-layerattn reproduce`: the tables as data, the grid and its shards, the run states on disk (finished,
resumed, restarted, stale), the aggregation maths, a tiny grid end to end on the embedded digits (with resume),
one job through submitit's local executor, and the one-line errors."""
import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.cli import main
from timm_layerattn.tools.reproduce import runs as runs_mod
from timm_layerattn.tools.reproduce.report import collect, mean_std, write_reports
from timm_layerattn.tools.reproduce.runs import (
    RESULT_FILE, SPEC_FILE, Run, Settings, execute, parse_shard, plan_runs, run_state, scaled_schedule, shard_runs,
    train_namespace, train_values)
from timm_layerattn.tools.reproduce.tables import TABLES, PaperCell, Row, Table

# A run of a few seconds: 32 digits, 2 steps of 16, 1 epoch, validated on 16 images.
TINY = ['--epochs', '1', '--train-samples', '32', '--val-samples', '16', '-b', '16']
GRID = ['kcla-table1', '--rows', 'resnet', '--depths', '20']


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_table_cell_is_a_registered_model_that_builds_with_its_kwargs():
    """The tables are data naming models and kwargs other modules provide: each cell must build."""
    for table in TABLES.values():
        for depth, row in table.cells():
            name = row.model_name(depth)
            assert timm.is_model(name), f'{table.name} {row.label}: {name} is not registered'
            timm.create_model(name, device='meta', **dict(row.kwargs))


def test_tables_hold_the_papers_grid():
    t1, t5, as2 = TABLES['kcla-table1'], TABLES['kcla-table5'], TABLES['as-table2']
    # Table I: 8 rows at 20 and 56, 6 at 110 (no Layer Att / MRLA-B there), on both CIFARs.
    assert [len([c for c in t1.cells() if c[0] == d]) for d in (20, 56, 110)] == [8, 8, 6]
    assert t1.row('kcla').paper[('cifar100', 56)] == PaperCell(params_m=0.65)
    # Table V: ResNet-56 on CIFAR-100, one base and nine ablations; the head dims are the paper's.
    assert t5.depths == (56,) and t5.datasets == ('torch/cifar100',) and len(t5.rows) == 10
    assert [dict(r.kwargs).get('head_dim') for r in t5.rows if r.key.startswith('e-')] == [2, 4, 8, 32]
    assert all(r.model_name(56) == 'cifar_resnet56_kcla' for r in t5.rows)
    # AS Table 2: errors (mean, SD) of 5 runs.
    assert as2.metric == 'error' and as2.row('plain').paper[('cifar100', 50)] == PaperCell(None, 40.02, 2.15)
    assert as2.row('as-out').paper[('cifar10', 50)].params_m == 12.7


def test_grid_order_and_shards_partition_it():
    table = TABLES['kcla-table1']
    grid = plan_runs(table, ['torch/cifar10', 'torch/cifar100'], [20, 56, 110], [r.key for r in table.rows],
                     [42, 43, 44])
    assert len(grid) == 2 * (8 + 8 + 6) * 3 and len(set(grid)) == len(grid)
    assert len({r.folder for r in grid}) == len(grid)  # one folder per run
    assert grid[0] == Run('kcla-table1', 'resnet', 'ResNet', 'torch/cifar10', 20, 42, 'cifar_resnet20')
    assert [r.seed for r in grid[:4]] == [42, 43, 44, 42]
    for n in range(1, 8):
        shards = [shard_runs(grid, (i, n)) for i in range(1, n + 1)]
        flat = [r for s in shards for r in s]
        assert sorted(flat, key=grid.index) == grid and len(flat) == len(set(flat))  # a partition
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Each shard mixes depths (the expensive 110 runs are spread out).
    assert all({r.depth for r in shard_runs(grid, (i, 4))} == {20, 56, 110} for i in range(1, 5))
    assert parse_shard('2/4') == (2, 4) and parse_shard(' 1 / 1 ') == (1, 1)
    for bad in ('3/2', '0/2', '1/0', 'x', '1', '-1/2', ''):
        with pytest.raises(Exception, match='expected I/N'):
            parse_shard(bad)


def test_scaled_schedule_keeps_the_recipes_shape():
    from timm_layerattn.train import create_lr_scheduler, resolve_args
    assert scaled_schedule('kcla-cifar', 180) == dict(epochs=180, warmup_epochs=10, decay_milestones=[100, 150],
                                                      decay_iters=[])
    assert scaled_schedule('kcla-cifar', 18) == dict(epochs=18, warmup_epochs=1, decay_milestones=[10, 15],
                                                     decay_iters=[])
    # as-cifar counts iterations (decays at 32k and 48k of 64k): epochs, decays at 1/2 and 3/4 of the run.
    assert scaled_schedule('as-cifar', 164) == dict(epochs=164, warmup_epochs=0, decay_milestones=[82, 123],
                                                    decay_iters=[])
    # Through the trainer: the recipe's iteration counts are gone, the lr drops at the scaled epochs.
    run = plan_runs(TABLES['as-table2'], ['digits'], [50], ['resnet'], [0])[0]
    args = resolve_args(train_namespace(run, Settings('as-cifar', epochs=4), Path('unused'), None))
    assert args.iters is None and args.decay_iters == [] and args.epochs == 4 and args.decay_milestones == [2, 3]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = create_lr_scheduler(opt, args, updates_per_epoch=10)
    lrs = []
    for epoch in range(4):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_run_states_on_disk(tmp_path):
    run = plan_runs(TABLES['kcla-table1'], ['digits'], [20], ['kcla'], [42])[0]
    spec = train_values(run, Settings('kcla-cifar', epochs=3))
    d = tmp_path / run.folder
    assert run_state(d, spec) == ('new', None)
    d.mkdir(parents=True)
    (d / 'log.json').write_text('{}')
    assert run_state(d, spec)[0] == 'stale'  # files, but not a run of ours
    (d / SPEC_FILE).write_text(json.dumps(dict(spec=spec)))
    assert run_state(d, spec) == ('new', None)  # started, died before its first checkpoint: restart
    (d / 'last.pth.tar').write_bytes(b'')
    assert run_state(d, spec) == ('resume', None)
    (d / RESULT_FILE).write_text(json.dumps(dict(spec=spec)))
    assert run_state(d, spec) == ('done', None)
    other = dict(spec, epochs=5)
    state, why = run_state(d, other)
    assert state == 'stale' and why == 'epochs 3 there, 5 now'
    (d / RESULT_FILE).write_text('{"spec": ')  # a torn file cannot exist (atomic writes), but is not "done"
    assert run_state(d, spec) == ('resume', None)


def test_mean_std_and_aggregation_of_result_files(tmp_path):
    assert mean_std([]) == (None, None) and mean_std([3.0]) == (3.0, None)
    values = [94.1, 94.9, 93.7, 94.4]
    assert mean_std(values) == pytest.approx((statistics.mean(values), statistics.stdev(values)))

    table = TABLES['as-table2']
    settings = Settings('as-cifar', epochs=2)
    grid = plan_runs(table, ['torch/cifar10'], [50], ['resnet', 'plain'], [42, 43, 44])
    top1 = {('resnet', 42): 94.0, ('resnet', 43): 95.0, ('resnet', 44): 96.5, ('plain', 42): 90.0}
    for run in grid:
        d = tmp_path / run.folder
        d.mkdir(parents=True)
        if (run.row, run.seed) in top1:
            spec = train_values(run, settings)
            (d / RESULT_FILE).write_text(json.dumps(dict(
                spec=spec, final_top1=top1[run.row, run.seed], best_top1=top1[run.row, run.seed] + 1,
                num_params=23520842 if run.row == 'resnet' else 20744266, num_classes=10)))
    # A result of other settings does not count.
    stale = grid[-1]
    (tmp_path / stale.folder / RESULT_FILE).write_text(json.dumps(dict(
        spec=dict(train_values(stale, settings), epochs=9), final_top1=1.0, num_params=1, num_classes=10)))

    cells = collect(table, grid, settings, tmp_path, 'final')
    resnet, plain = cells
    errors = [6.0, 5.0, 3.5]  # the AS table reports errors: 100 - top-1
    assert resnet.values == pytest.approx(errors) and resnet.seeds == [42, 43, 44] and resnet.planned == 3
    assert resnet.mean_std == pytest.approx((statistics.mean(errors), statistics.stdev(errors)))
    assert plain.values == pytest.approx([10.0]) and plain.planned == 3
    assert resnet.paper == PaperCell(23.5, 5.10, 0.10)
    best = collect(table, grid, settings, tmp_path, 'best')[0]
    assert best.values == pytest.approx([e - 1 for e in errors])

    csv_path, md_path = write_reports(table, cells, settings, tmp_path)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r['row'] for r in rows] == ['resnet', 'plain']
    r = rows[0]
    assert (r['n'], r['planned'], r['params'], r['paper_params_m'], r['paper_mean'], r['paper_std']) == (
        '3', '3', '23520842', '23.50', '5.10', '0.10')
    assert float(r['mean']) == pytest.approx(statistics.mean(errors), abs=1e-4)
    assert float(r['std']) == pytest.approx(statistics.stdev(errors), abs=1e-4)
    assert r['seeds'] == '42 43 44' and rows[1]['std'] == ''
    md = md_path.read_text()
    line = next(l for l in md.splitlines() if l.startswith('| ResNet-50'))
    assert line == (f'| ResNet-50: `cifar_resnet50` | 50 | 23.52 | 23.50 | {statistics.mean(errors):.2f} ± '
                    f'{statistics.stdev(errors):.2f} | 5.10 ± 0.10 | 3/3 |')
    assert '| plain-ResNet-50: `cifar_resnet50_plain` | 50 | 20.74 | – | 10.00 | 8.41 ± 0.20 | 1/3 |' in md


def test_paper_params_on_another_dataset_come_from_the_column_with_as_many_classes(tmp_path):
    """On digits (10 classes) the paper's CIFAR-10 parameter count applies; its accuracies do not."""
    table = Table('t', 't', 'kcla-cifar', ('torch/cifar10',), (20,), rows=(
        Row('r', 'R', 'cifar_resnet{depth}', paper={('cifar10', 20): PaperCell(0.22, 91.0, 0.2),
                                                    ('cifar100', 20): PaperCell(0.24, 67.0, 0.3)}),))
    settings = Settings('kcla-cifar')
    run = plan_runs(table, ['digits'], [20], ['r'], [1])[0]
    (tmp_path / run.folder).mkdir(parents=True)
    (tmp_path / run.folder / RESULT_FILE).write_text(json.dumps(dict(
        spec=train_values(run, settings), final_top1=80.0, num_params=220378, num_classes=10)))
    cell, = collect(table, [run], settings, tmp_path)
    assert cell.paper == PaperCell(params_m=0.22)


def test_tiny_grid_trains_skips_finished_runs_and_aggregates(tmp_path, capsys):
    out = tmp_path / 'rep'
    rc, stdout, err = _cli(capsys, 'reproduce', *GRID, '--seeds', '2', *TINY, '-o', out)
    assert rc == 0, err
    assert '2 runs (1 dataset x 1 cell x 2 seeds); 0 finished earlier, 2 to train' in stdout
    lines = [l for l in stdout.splitlines() if l.startswith('[')]
    assert [l.split(':')[0] for l in lines] == ['[1/2] digits ResNet d20 seed 42'] * 2 + [
        '[2/2] digits ResNet d20 seed 43'] * 2
    assert 'top-1' in lines[1] and '0.22M params' in lines[1] and '1 left' in lines[1]
    results = [json.loads((out / f'runs/digits/resnet-d20/seed{s}' / RESULT_FILE).read_text()) for s in (42, 43)]
    assert [r['spec']['seed'] for r in results] == [42, 43] and all(r['epochs'] == 1 for r in results)
    assert all(r['num_params'] == 220378 and r['num_classes'] == 10 and r['eval_count'] == 16 for r in results)
    # Each seed trained its own model (different seeds, different weights).
    sds = [torch.load(out / f'runs/digits/resnet-d20/seed{s}/last.pth.tar', weights_only=True)['state_dict']
           for s in (42, 43)]
    assert not torch.equal(sds[0]['conv1.weight'], sds[1]['conv1.weight'])
    row, = csv.DictReader(open(out / 'results.csv'))
    finals = [r['final_top1'] for r in results]
    assert float(row['mean']) == pytest.approx(statistics.mean(finals), abs=1e-4)
    assert float(row['std']) == pytest.approx(statistics.stdev(finals), abs=1e-4)
    assert row['params'] == '220378' and row['n'] == '2' and row['paper_params_m'] == '0.22'
    assert (out / 'results.md').read_text() in stdout

    # Again, one more seed: the two finished runs are skipped, only the new one trains.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob('runs/*/*/*/*')}
    rc, stdout, err = _cli(capsys, 'reproduce', *GRID, '--seeds', '3', *TINY, '-o', out)
    assert rc == 0, err
    assert '3 runs (1 dataset x 1 cell x 3 seeds); 2 finished earlier, 1 to train' in stdout
    trained = [l.split(':')[0] for l in stdout.splitlines() if l.startswith('[')]
    assert trained == ['[1/1] digits ResNet d20 seed 44'] * 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert next(csv.DictReader(open(out / 'results.csv')))['n'] == '3'

    # Other settings into the same folder are refused (nothing trains), unless --overwrite.
    rc, _, err = _cli(capsys, 'reproduce', *GRID, '--seeds', '1', *TINY, '--epochs', '2', '-o', out)
    assert rc == 2 and err.count('\n') == 1
    assert err.endswith('1 run in --output has other settings (runs/digits/resnet-d20/seed42: epochs 1 there, 2 '
                        'now, decay_milestones [1, 1] there, [1, 2] now); --overwrite redoes it, or choose another '
                        '--output\n')
    # --collect trains nothing and writes the results again.
    (out / 'results.md').unlink()
    rc, stdout, err = _cli(capsys, 'reproduce', *GRID, '--seeds', '3', *TINY, '-o', out, '--collect')
    assert rc == 0 and 'to train' in stdout and not [l for l in stdout.splitlines() if l.startswith('[')]
    assert '| 3/3 |' in (out / 'results.md').read_text()


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A run killed after its first epoch continues at the second; the result covers both."""
    from timm_layerattn.train import loop
    run = plan_runs(TABLES['kcla-table1'], ['digits'], [20], ['resnet'], [7])[0]
    settings = Settings('kcla-cifar', epochs=2, train_samples=32, val_samples=16, batch_size=16)
    epochs_run, original = [], loop._run_epoch

    def run_epoch(epoch, ctx, log):
        epochs_run.append(epoch)
        original(epoch, ctx, log)
        if epoch == 0 and len(epochs_run) == 1:
            raise KeyboardInterrupt  # killed once the epoch's checkpoint is saved

    monkeypatch.setattr(loop, '_run_epoch', run_epoch)
    with pytest.raises(KeyboardInterrupt):
        execute(run, settings, str(tmp_path))
    d = tmp_path / run.folder
    assert not (d / RESULT_FILE).exists() and run_state(d, train_values(run, settings))[0] == 'resume'
    result = execute(run, settings, str(tmp_path))
    assert epochs_run == [0, 1] and result['resumed'] and result['epochs'] == 2
    assert json.loads((d / 'log.json').read_text())['finished']
    assert execute(run, settings, str(tmp_path)) == result and epochs_run == [0, 1]  # finished: nothing runs


def test_submitit_local_executor_runs_a_job(tmp_path, capsys):
    out = tmp_path / 'rep'
    rc, stdout, err = _cli(capsys, 'reproduce', *GRID, '--seeds', '1', *TINY, '-o', out, '--launcher', 'submitit',
                           '--slurm-cluster', 'local', '--slurm-time', '10', '--slurm-gpus', '0')
    assert rc == 0, err + stdout
    assert 'submitted 1 job to local' in stdout
    line, = [l for l in stdout.splitlines() if l.startswith('[1/1]')]
    job_id = line.rsplit('(job ', 1)[1].rstrip(')')
    assert 'top-1' in line and job_id.isdigit() and int(job_id) != __import__('os').getpid()
    result = json.loads((out / 'runs/digits/resnet-d20/seed42' / RESULT_FILE).read_text())
    assert result['epochs'] == 1 and (out / 'submitit').is_dir() and '| 1/1 |' in (out / 'results.md').read_text()


def test_reproduce_does_not_import_submitit_unless_launched(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, 'submitit', raising=False)
    rc, _, err = _cli(capsys, 'reproduce', *GRID, '--dry-run', '-o', tmp_path / 'r')
    assert rc == 0, err
    assert 'submitit' not in sys.modules


@pytest.mark.parametrize('argv,fragment', [
    (['nosuch'], "argument TABLE: invalid choice: 'nosuch'"),
    ([*GRID, '--shard', '3/2'], "argument --shard: expected I/N with 1 <= I <= N (e.g. 1/4), got '3/2'"),
    ([*GRID, '--shard', '0/2'], 'argument --shard: expected I/N'),
    ([*GRID, '--seeds', '0'], 'argument --seeds: must be an integer >= 1'),
    (['kcla-table1', '--depths', '32'], 'kcla-table1 has depths 20, 56, 110, not 32'),
    (['as-table2', '--depths', '20'], 'as-table2 has depth 50, not 20'),
    (['kcla-table1', '--rows', 'kcla', 'senet'], "kcla-table1 has no row 'senet'; its rows: resnet, se, dia"),
    (['kcla-table1', '--rows', 'la', '--depths', '110'], 'kcla-table1: no run in this selection'),
    ([*GRID, '--dataset', 'torch/cifar10'], '--dataset torch/cifar10 needs --data-dir'),
    ([*GRID, '--dataset', 'digits', '--data-dir', '{tmp}'],
     '--data-dir is for files on disk, but --dataset digits is embedded'),
    ([*GRID, '--data-dir', '{tmp}'], "cannot open dataset 'torch/cifar10' split 'train' at {tmp}"),
    ([*GRID, '--dataset', 'torch/cifar10', '--data-dir', '{tmp}/nope'],
     'dataset folder not found: {tmp}/nope (add --dataset-download to fetch it)'),
    ([*GRID, '-o', '{tmp}/mine'], 'output folder {tmp}/mine is not a reproduction folder'),
    ([*GRID, '-o', '{tmp}/other'], '{tmp}/other holds a reproduction of as-table2, not of kcla-table1'),
    ([*GRID, '-o', '{tmp}/nothing', '--collect'], '--collect: {tmp}/nothing holds no reproduction'),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, fragment):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'reproduce.json').write_text(json.dumps(
        {'timm_layerattn': {'version': '0', 'kind': 'reproduce', 'table': 'as-table2'}}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    rc, _, err = _cli(capsys, 'reproduce', *[a.replace('{tmp}', str(tmp_path)) for a in argv])
    assert rc == 2 and 'Traceback' not in err
    assert fragment.replace('{tmp}', str(tmp_path)) in err
    assert err.strip().splitlines()[-1].startswith('timm-layerattn')
    assert len([l for l in err.splitlines() if l.startswith('timm-layerattn')]) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before  # nothing written


def test_unregistered_models_and_missing_launcher_are_named(tmp_path, capsys, monkeypatch):
    import shutil
    from timm_layerattn.tools.reproduce import tables
    fake = Table('fake', 'fake', 'kcla-cifar', ('torch/cifar10',), (20,), rows=(
        Row('a', 'A', 'cifar_resnet{depth}_nosuch'), Row('b', 'B', 'cifar_resnet{depth}')))
    monkeypatch.setitem(tables.TABLES, 'fake', fake)
    rc, _, err = _cli(capsys, 'reproduce', 'fake', '-o', tmp_path / 'r')
    assert rc == 2 and 'fake: model not registered: cifar_resnet20_nosuch; see `timm-layerattn list`' in err
    assert err.count('\n') == 1 and not (tmp_path / 'r').exists()
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    rc, _, err = _cli(capsys, 'reproduce', *GRID, '-o', tmp_path / 'r', '--launcher', 'submitit')
    assert rc == 2 and 'no SLURM on this machine (sbatch not found); use --slurm-cluster local' in err
    monkeypatch.setitem(sys.modules, 'submitit', None)  # as if not installed
    rc, _, err = _cli(capsys, 'reproduce', *GRID, '-o', tmp_path / 'r', '--launcher', 'submitit')
    assert rc == 2 and 'needs submitit: pip install "timm-layerattn[slurm]"' in err
    assert not (tmp_path / 'r').exists()


def test_quick_preset_and_dry_run(tmp_path, capsys):
    rc, out, err = _cli(capsys, 'reproduce', 'kcla-table1', '--quick', '--dry-run', '-o', tmp_path / 'r')
    assert rc == 0, err
    assert out.splitlines()[0].startswith('timm-layerattn reproduce kcla-table1: 8 runs (1 dataset x 8 cells x 1 '
                                          'seed); 0 finished earlier, 8 to train')
    assert out.splitlines()[-1].split() == ['new', 'runs/digits/kcla-d20/seed42', 'cifar_resnet20_kcla']
    # Flags given win over the preset; a dry run writes nothing.
    rc, out, err = _cli(capsys, 'reproduce', 'kcla-table1', '--quick', '--seeds', '2', '--depths', '56', '--shard',
                        '2/3', '--dry-run', '-o', tmp_path / 'r')
    assert rc == 0, err
    assert '16 runs (1 dataset x 8 cells x 2 seeds, shard 2/3: 5 of them)' in out
    assert [l.split()[1] for l in out.splitlines()[1:]] == [
        'runs/digits/resnet-d56/seed43', 'runs/digits/dia-d56/seed42', 'runs/digits/la-d56/seed43',
        'runs/digits/mrlab-d56/seed42', 'runs/digits/dynlal-d56/seed43']
    assert not (tmp_path / 'r').exists()


def test_submitit_job_requeues_itself_with_its_arguments():
    """Timed out or preempted on SLURM, the job is resubmitted with the same run, which then resumes."""
    from timm_layerattn.tools.reproduce.launch import RunJob
    run = plan_runs(TABLES['kcla-table1'], ['digits'], [20], ['resnet'], [1])[0]
    job = RunJob()
    delayed = job.checkpoint(run, Settings('kcla-cifar'), '/out', False)
    assert delayed.function is job and delayed.args == (run, Settings('kcla-cifar'), '/out', False)
