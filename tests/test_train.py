"""`timm-layerattn train`: recipes, schedules, data, checkpoints/resume, logs and bad input."""
import csv
import json
from pathlib import Path

import pytest
import torch

from timm_layerattn._utils.errors import UserError
from timm_layerattn.train import (
    RECIPES, create_lr_scheduler, parse_args, read_checkpoint, recipe_markdown, resolve_args, state_checksum, train)
from timm_layerattn.train.args import batch_and_lr_line
from timm_layerattn.train.setup import warmup_warning

TINY = ['--dataset', 'digits', '--model', 'cifar_resnet20', '--train-samples', '48', '--val-samples', '24', '-b', '16',
        '--epochs', '1', '--no-progress', '--quiet', '--workers', '0']


def _lrs(recipe, points, updates_per_epoch=391, **overrides):
    """lr at each (epoch, update) point of a recipe's schedule, driven the way the trainer drives it."""
    args = resolve_args(parse_args(['--model', 'cifar_resnet20', '--recipe', recipe]))
    for k, v in overrides.items():
        setattr(args, k, v)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = create_lr_scheduler(opt, args, updates_per_epoch)
    out = []
    for epoch, update in points:
        sched.step(epoch)
        sched.step_update(update)
        out.append(opt.param_groups[0]['lr'])
    return out


def test_recipe_values_and_overrides():
    a = resolve_args(parse_args(['--model', 'x', '--recipe', 'kcla-cifar']))
    assert (a.opt, a.lr, a.momentum, a.weight_decay, a.batch_size, a.epochs) == ('momentum', 0.1, 0.9, 1e-4, 128, 180)
    assert (a.decay_milestones, a.warmup_epochs, a.warmup_lr, a.smoothing, a.train_aug) == ([100, 150], 10, 1e-3, 0.0,
                                                                                          'cifar')
    b = resolve_args(parse_args(['--model', 'x', '--recipe', 'kcla-cifar', '--lr', '0.05', '--epochs', '3',
                                 '--no-decay-all']))
    assert (b.lr, b.epochs, b.decay_all, b.batch_size) == (0.05, 3, False, 128)
    assert RECIPES['kcla-cifar']['lr_base'] == 0.1  # overriding does not touch the preset
    s = resolve_args(parse_args(['--model', 'x', '--recipe', 'as-cifar']))
    assert (s.iters, s.decay_iters, s.warmup_epochs, s.pad, s.hflip) == (64000, [32000, 48000], 0, 4, 0.5)
    with pytest.raises(UserError, match="unknown recipe 'cifar-kcla'.*kcla-cifar"):
        resolve_args(parse_args(['--model', 'x', '--recipe', 'cifar-kcla']))


def test_deit_and_efficientnet_recipes():
    """The official DeiT-MRLA recipe (AdamW lr 5e-4 x batch / 512: linear, also for AdamW) and the MRLA
    README's EfficientNet command, resolved; every timm part they name accepts the values."""
    d = resolve_args(parse_args(['--model', 'x', '--recipe', 'deit-mrla', '-b', '512']))
    assert (d.opt, d.lr, d.opt_eps, d.weight_decay, d.decay_all, d.epochs, d.sched) == (
        'adamw', pytest.approx(5e-4), 1e-8, 0.05, False, 300, 'cosine')
    assert (d.warmup_epochs, d.warmup_lr, d.min_lr, d.smoothing, d.mixup, d.cutmix) == (5, 1e-6, 1e-5, 0.1, 0.8, 1.0)
    assert (d.aa, d.reprob, d.aug_repeats, d.drop_path, d.model_ema, d.model_ema_decay) == (
        'rand-m9-mstd0.5-inc1', 0.25, 3, 0.1, True, 0.99996)
    assert resolve_args(parse_args(['--model', 'x', '--recipe', 'deit-mrla'])).batch_size == 1024
    off = resolve_args(parse_args(['--model', 'x', '--recipe', 'deit-mrla', '--no-model-ema', '--aug-repeats', '0',
                                   '--drop-path', '0.2']))
    assert (off.model_ema, off.aug_repeats, off.drop_path) == (False, 0, 0.2)
    e = resolve_args(parse_args(['--model', 'x', '--recipe', 'effnet-mrla']))
    assert (e.opt, e.lr, e.batch_size, e.opt_eps, e.weight_decay, e.epochs) == ('rmsproptf', 0.048, 768, 1e-3, 1e-5, 350)
    assert (e.sched, e.decay_epochs, e.decay_rate, e.aa, e.reprob, e.drop, e.drop_path) == (
        'step', 2.4, 0.97, 'rand-m9-mstd0.5', 0.2, 0.2, 0.2)
    plain = resolve_args(parse_args(['--model', 'x']))
    assert (plain.aa, plain.reprob, plain.aug_repeats, plain.mixup, plain.model_ema, plain.opt_eps, plain.drop_path) == (
        None, 0.0, 0, 0.0, False, None, None)
    from timm_layerattn.train.data import create_transforms
    train_tf, _ = create_transforms(d, dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5,) * 3,
                                            std=(0.5,) * 3, crop_pct=0.875, crop_mode='center'))
    erasing = [t for t in train_tf.transforms if type(t).__name__ == 'RandomErasing']
    assert len(erasing) == 1 and erasing[0].probability == 0.25 and erasing[0].mode == 'pixel'
    import timm
    from timm_layerattn.train.setup import _create_optimizer
    opt = _create_optimizer(timm.create_model('cifar_resnet20'), e)
    assert type(opt).__name__ == 'RMSpropTF' and opt.param_groups[0]['eps'] == 1e-3
    lr = _lrs('effnet-mrla', [(0, 0), (3, 0), (5, 0)])
    assert lr == pytest.approx([1e-6, 0.048 * 0.97 ** 1, 0.048 * 0.97 ** 2])


@pytest.mark.parametrize('recipe,model', [('deit-mrla', 'deit_tiny_patch16_224_mrlal'),
                                          ('effnet-mrla', 'efficientnet_b0_mrlal')])
def test_trunk_recipes_train(tmp_path, recipe, model):
    """The DeiT and EfficientNet recipes run end to end through the trainer (RandAugment, random erasing, mixup /
    cutmix, repeated augmentation, EMA, RMSpropTF) on a few embedded digits at 32 px."""
    from timm_layerattn.train import main
    out = tmp_path / 'run'
    assert main(['--recipe', recipe, '--model', model, '--dataset', 'digits', '--img-size', '32', '--iters', '2',
                 '-b', '8', '--train-samples', '32', '--val-samples', '8', '--workers', '0', '--no-progress',
                 '--quiet', '--output', str(out)]) == 0
    log = json.loads((out / 'log.json').read_text())
    args = log['args']
    assert log['recipe'] == recipe and (args['aug_repeats'], args['model_ema']) == (
        (3, True) if recipe == 'deit-mrla' else (0, False))
    assert (out / 'last.pth.tar').is_file()


def test_repeated_augmentation_sampler():
    """--aug-repeats N: every image N times per epoch, the copies in one place on one rank (they land on different
    ranks when distributed), one epoch's worth of samples, reshuffled per epoch."""
    from timm_layerattn.train.data import create_loaders
    args = resolve_args(parse_args(['--model', 'x', '--aug-repeats', '3', '-b', '4', '--workers', '0']))
    ds = torch.utils.data.TensorDataset(torch.arange(24))
    train, _ = create_loaders(args, ds, ds, torch.device('cpu'), distributed=False, rank=0, world_size=1)
    seen = torch.cat([b[0] for b in train])
    assert len(seen) == 24 and all((seen[i:i + 3] == seen[i]).all() for i in range(0, 24, 3))
    train.sampler.set_epoch(1)
    assert not torch.equal(torch.cat([b[0] for b in train]), seen)


def _resolved(*argv, world_size=1):
    return resolve_args(parse_args(['--model', 'cifar_resnet20', *argv]), world_size)


def test_batch_is_per_rank_and_lr_follows_the_global_batch():
    # Without -b the recipe's total batch is split over the ranks: the papers' batch and lr on any GPU count.
    a = _resolved('--recipe', 'la-imagenet', world_size=8)
    assert (a.batch_size, a.global_batch_size, a.lr) == (32, 256, 0.1)
    assert batch_and_lr_line(a) == 'global batch 256 = 8 ranks x 32, lr 0.1 (recipe lr 0.1 @ 256)'
    a = _resolved('--recipe', 'kcla-cifar')
    assert batch_and_lr_line(a) == 'global batch 128 = 1 rank x 128, lr 0.1 (recipe lr 0.1 @ 128)'
    # -b is per rank (timm): 8 x 256 = 2048 scales the lr linearly, unless --no-lr-scale; --lr is used as given.
    a = _resolved('--recipe', 'la-imagenet', '-b', '256', world_size=8)
    assert (a.global_batch_size, a.lr) == (2048, pytest.approx(0.8))
    assert batch_and_lr_line(a) == ('global batch 2048 = 8 ranks x 256, lr 0.8 (linear scaling of recipe lr 0.1 @ '
                                    '256; --no-lr-scale keeps 0.1)')
    a = _resolved('--recipe', 'la-imagenet', '-b', '256', '--no-lr-scale', world_size=8)
    assert a.lr == 0.1 and a.lr_origin == 'recipe lr 0.1 @ 256, not scaled: --no-lr-scale'
    a = _resolved('--recipe', 'la-imagenet', '-b', '256', '--lr', '0.3', world_size=8)
    assert a.lr == 0.3 and batch_and_lr_line(a).endswith('lr 0.3 (--lr, not scaled)')
    # timm's rule for the scaling: sqrt for Ada* / LAMB optimizers (unless --lr-base-scale), linear otherwise.
    a = _resolved('--recipe', 'digits', '-b', '64')
    assert (a.lr_base_scale, a.lr) == ('sqrt', pytest.approx(2e-3 * 2 ** 0.5))
    assert _resolved('--recipe', 'digits', '-b', '64', '--lr-base-scale', 'linear').lr == pytest.approx(4e-3)
    # Given --lr-base / --lr-base-size replace the recipe's (and the default batch follows the size).
    a = _resolved('--lr-base', '0.05', '--lr-base-size', '64', world_size=2)
    assert batch_and_lr_line(a) == 'global batch 64 = 2 ranks x 32, lr 0.05 (base lr 0.05 @ 64)'
    # A total that does not split evenly: the lr follows the global batch actually run, and the line says why.
    a = _resolved('--recipe', 'kcla-cifar', world_size=3)
    assert (a.batch_size, a.global_batch_size, a.lr) == (42, 126, pytest.approx(0.1 * 126 / 128))
    assert a.lr_origin.endswith('; 128 does not split evenly over 3 ranks')
    # The model card states the global batch and where a scaled lr came from.
    card = recipe_markdown(_resolved('--recipe', 'la-imagenet', '-b', '256', world_size=8), world_size=8)
    assert '- batch 2048 (8 ranks x 256), 100 epochs' in card
    assert 'lr 0.8 (linear scaling of recipe lr 0.1 @ 256' in card
    assert 'lr 0.1, momentum' in recipe_markdown(_resolved('--recipe', 'la-imagenet', world_size=8), world_size=8)
    # The help says what -b means and how the recipes' batches read.
    import argparse
    from timm_layerattn.train import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = ' '.join(parser.format_help().split())
    assert 'batch size per rank, as in timm' in text
    assert 'la-imagenet layer-attention ImageNet (MRLA decay): SGD lr 0.1 @ 256' in text
    assert '--lr LR learning rate, used as given (not scaled with the batch)' in text


def test_warmup_as_long_as_the_run_is_flagged():
    # 10 warm-up epochs in a 1-epoch run: the lr stays at warmup_lr = lr / 100.
    msg = warmup_warning(_resolved('--recipe', 'kcla-cifar', '--epochs', '1'), updates_per_epoch=391)
    assert msg == ('the 10-epoch warm-up is not shorter than the 1-epoch run: the lr rises from 0.001 to at most '
                   '0.001 and never reaches 0.1 (lower --warmup-epochs)')
    assert warmup_warning(_resolved('--recipe', 'kcla-cifar', '--epochs', '10'), 391) is not None
    assert warmup_warning(_resolved('--recipe', 'kcla-cifar', '--epochs', '11'), 391) is None
    assert warmup_warning(_resolved('--recipe', 'kcla-cifar', '--epochs', '1', '--warmup-epochs', '0'), 391) is None
    # --iters with a schedule counted in updates: 1 warm-up epoch = 10 updates against a 10-update run.
    a = _resolved('--recipe', 'as-cifar', '--iters', '10', '--warmup-epochs', '1')
    assert 'not shorter than the 10-step run (--iters)' in warmup_warning(a, updates_per_epoch=10)
    assert warmup_warning(a, updates_per_epoch=9) is None
    # --iters with an epoch-stepped schedule: counted in the epochs the steps span.
    a = _resolved('--recipe', 'kcla-cifar', '--iters', '25', '--warmup-epochs', '3')
    a.epochs = 3  # what the trainer derives: ceil(25 / 10)
    assert warmup_warning(a, updates_per_epoch=10) is not None
    a.epochs = 4
    assert warmup_warning(a, updates_per_epoch=7) is None


def test_recipe_schedules():
    # KCLA / MRLA CIFAR: linear warm-up 0.001 -> 0.1 over 10 epochs, x0.1 at 100 and 150.
    lr = _lrs('kcla-cifar', [(0, 0), (5, 0), (10, 0), (99, 0), (100, 0), (149, 0), (150, 0), (179, 0)])
    assert lr == pytest.approx([1e-3, 1e-3 + 5 * (0.1 - 1e-3) / 10, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    # AS CIFAR: counted in iterations.
    lr = _lrs('as-cifar', [(0, 0), (81, 31999), (81, 32000), (122, 47999), (122, 48000), (163, 63999)])
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    # ImageNet, MRLA decay (every 30) and KCLA decay (40 / 70 / 90), 3 warm-up epochs from 1e-4.
    lr = _lrs('la-imagenet', [(0, 0), (1, 0), (3, 0), (29, 0), (30, 0), (60, 0), (90, 0)], 5005)
    assert lr == pytest.approx([1e-4, 1e-4 + (0.1 - 1e-4) / 3, 0.1, 0.1, 0.01, 1e-3, 1e-4])
    lr = _lrs('kcla-imagenet', [(39, 0), (40, 0), (70, 0), (90, 0)], 5005)
    assert lr == pytest.approx([0.1, 0.01, 1e-3, 1e-4])


def test_papers_optimizer_is_classical_momentum_with_decay_everywhere():
    import timm
    from timm.optim import create_optimizer_v2
    args = resolve_args(parse_args(['--model', 'cifar_resnet20', '--recipe', 'mrla-cifar']))
    model = timm.create_model('cifar_resnet20')
    opt = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                              momentum=args.momentum, filter_bias_and_bn=not args.decay_all)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g['nesterov'] is False and g['momentum'] == 0.9 and g['weight_decay'] == 1e-4 for g in opt.param_groups)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_cifar_transform_pads_crops_and_flips():
    from PIL import Image
    from timm_layerattn.data import cifar_train_transform
    img = Image.fromarray((torch.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).to(torch.uint8).numpy())
    ident = cifar_train_transform(32, (0, 0, 0), (1, 1, 1), padding=0, hflip=0.0)(img)
    flipped = cifar_train_transform(32, (0, 0, 0), (1, 1, 1), padding=0, hflip=1.0)(img)
    assert torch.equal(flipped, ident.flip(-1))
    torch.manual_seed(0)
    crops = [cifar_train_transform(32, (0, 0, 0), (1, 1, 1), padding=4, hflip=0.0)(img) for _ in range(20)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    # Some crops are shifted: zero padding enters and they differ from the unshifted image.
    assert any((c == 0).all(dim=0).any() for c in crops) and any(not torch.equal(c, ident) for c in crops)


def test_digits_dataset_split_is_fixed_and_disjoint():
    from timm_layerattn.data import DigitsDataset
    tr, va = DigitsDataset('train'), DigitsDataset('val')
    assert (len(tr), len(va)) == (1438, 359)
    assert tr.images.shape[1:] == (3, 32, 32) and tr.images.dtype == torch.uint8
    assert sorted(set(va.targets)) == list(range(10))
    rows_tr = {bytes(x.numpy()) for x in tr.images}
    assert not any(bytes(x.numpy()) in rows_tr for x in va.images[:50])
    assert DigitsDataset('validation').targets == va.targets  # same split every time


def test_train_logs_checkpoints_and_resume(tmp_path, capsys):
    out = tmp_path / 'run'
    loud = [a for a in TINY if a != '--quiet']
    res = train(parse_args(loud + ['--output', str(out), '--epochs', '2', '--recipe', 'digits']))
    assert [h['epoch'] for h in res.history] == [0, 1]
    assert res.best_checkpoint == out / 'model_best.pth.tar' and res.best_epoch in (0, 1)
    rows = list(csv.DictReader(open(out / 'summary.csv')))
    assert [r['epoch'] for r in rows] == ['0', '1'] and {'train_loss', 'eval_top1', 'lr'} <= set(rows[0])
    log = json.loads((out / 'log.json').read_text())
    assert log['finished'] and log['model'] == 'cifar_resnet20' and len(log['epochs']) == 2
    assert log['best']['top1'] == max(h['eval_top1'] for h in log['epochs'])
    # One epoch numbering (timm's, from 0) on the console, in summary.csv and in the checkpoint names.
    console = capsys.readouterr().out
    assert [line.split('  ')[0] for line in console.splitlines() if line.startswith('epoch ')] == [
        'epoch 0 (1 of 2)', 'epoch 1 (2 of 2)']
    assert (out / f'checkpoint-{res.best_epoch}.pth.tar').is_file()
    # -b 16 against the digits recipe's 32: AdamW follows timm's sqrt rule, and the run says so.
    assert 'global batch 16 = 1 rank x 16, lr 0.00141421 (sqrt scaling of recipe lr 0.002 @ 32' in console
    assert 'warning' not in console  # a 1-epoch warm-up in a 2-epoch run is fine

    # Checkpoints are plain dicts: plain torch.load with weights_only=True reads them.
    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['arch'] == 'cifar_resnet20' and ckpt['epoch'] == 1 and isinstance(ckpt['args'], dict)
    assert {'state_dict', 'optimizer', 'saver'} <= set(ckpt) and ckpt['updates'] == 6  # 2 epochs x 3 steps
    assert ckpt['args']['global_batch_size'] == 16 and ckpt['args']['lr'] == pytest.approx(2e-3 / 2 ** 0.5)
    model_sd = res.model.state_dict()
    assert all(torch.equal(model_sd[k], v) for k, v in ckpt['state_dict'].items())

    # Resume into the same folder: continues at epoch 2, keeps the earlier log rows, says where it continues.
    resume = ['--recipe', 'digits', '--resume', str(out / 'last.pth.tar')]
    res2 = train(parse_args(loud + ['--epochs', '3', *resume]))
    assert res2.output_dir == out and [h['epoch'] for h in res2.history] == [0, 1, 2]
    assert [r['epoch'] for r in csv.DictReader(open(out / 'summary.csv'))] == ['0', '1', '2']
    assert torch.load(out / 'last.pth.tar', weights_only=True)['epoch'] == 2
    console = capsys.readouterr().out
    assert (f'resumed from epoch 1, step 6 ({out / "last.pth.tar"}): epoch 1 was the last finished, training '
            f'continues with epoch 2') in console
    assert [line.split('  ')[0] for line in console.splitlines() if line.startswith('epoch ')] == ['epoch 2 (3 of 3)']
    # Resuming a finished run trains nothing, and says so.
    res3 = train(parse_args(TINY + ['--epochs', '3', *resume]))
    assert len(res3.history) == 3
    assert capsys.readouterr().out.strip() == (
        'warning: nothing to train: the checkpoint finished epoch 2 (step 9) and the run ends after epoch 2; '
        'raise --epochs / --iters to train on')


def test_train_image_folder_and_export(tmp_path):
    from PIL import Image
    root = tmp_path / 'data'
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 12), ('val', 6)):
        for c, name in enumerate(('cat', 'dog', 'emu')):
            (root / split / name).mkdir(parents=True)
            for i in range(n // 3 + 2):
                arr = (torch.rand(20, 24, 3, generator=g) * 60 + 80 * c).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / name / f'{i}.png')
    out, export = tmp_path / 'run', tmp_path / 'export'
    res = train(parse_args(['--model', 'cifar_resnet20_kcla', str(root), '--val-split', 'val', '-b', '6',
                            '--epochs', '1', '--output', str(out), '--export', str(export), '--no-progress', '--quiet',
                            '--workers', '0', '--recipe', 'kcla-cifar', '--warmup-epochs', '0', '--lr', '0.01']))
    assert res.num_classes == 3 and res.label_names == ['cat', 'dog', 'emu']
    assert res.export_dir == export and {p.name for p in export.iterdir()} == {'config.json', 'model.safetensors',
                                                                               'README.md'}
    cfg = json.loads((export / 'config.json').read_text())
    assert cfg['num_classes'] == 3 and cfg.get('label_names') == ['cat', 'dog', 'emu']
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32]
    card = (export / 'README.md').read_text()
    assert 'recipe `kcla-cifar`' in card and 'momentum' in card


def test_bad_input_is_a_user_error_before_training(tmp_path):
    def attempt(*extra):
        with pytest.raises(UserError) as e:
            train(parse_args(['--model', 'cifar_resnet20', '--no-progress', '--quiet', *extra]))
        assert not (tmp_path / 'never').exists()  # nothing was written
        return str(e.value)

    never = str(tmp_path / 'never')
    assert 'dataset folder not found' in attempt(str(tmp_path / 'nope'), '--output', never)
    assert 'no dataset folder given' in attempt('--output', never)
    flat = tmp_path / 'flat' / 'cls'
    flat.mkdir(parents=True)
    from PIL import Image
    Image.new('RGB', (8, 8)).save(flat / 'a.png')
    assert 'same images' in attempt(str(flat.parent), '--output', never)
    assert "unknown recipe 'imagenet'" in attempt('--recipe', 'imagenet', '--dataset', 'digits', '--output', never)
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert 'cannot be created' in attempt('--dataset', 'digits', '--output', str(blocker / 'sub'))
    assert 'not a folder' in attempt('--dataset', 'digits', '--output', str(blocker))
    assert 'unknown model' in attempt('--dataset', 'digits', '--model', 'cifar_resnet21', '--output', never)
    assert 'checkpoint not found' in attempt('--dataset', 'digits', '--resume', str(tmp_path / 'x.pth.tar'),
                                             '--output', never)


def test_resume_from_another_architecture_is_refused(tmp_path, capsys):
    out = tmp_path / 'r20'
    # (This run also checks the warm-up warning: one line, shown under --quiet too.)
    train(parse_args(TINY + ['--output', str(out), '--recipe', 'kcla-cifar', '--lr', '0.1']))
    assert capsys.readouterr().out == (
        'warning: the 10-epoch warm-up is not shorter than the 1-epoch run: the lr rises from 0.001 to at most 0.001 '
        'and never reaches 0.1 (lower --warmup-epochs)\n')
    ckpt = str(out / 'last.pth.tar')
    cases = (('cifar_resnet20_kcla', "checkpoint of 'cifar_resnet20', not of --model 'cifar_resnet20_kcla'"),
             ('cifar_resnet20', 'does not fit --model cifar_resnet20.*other shapes'))
    for model, match in cases:
        args = TINY + ['--resume', ckpt, '--output', str(tmp_path / 'new')]
        args[args.index('--model') + 1] = model
        if model == 'cifar_resnet20':
            args += ['--num-classes', '12']
        with pytest.raises(UserError, match=match):
            train(parse_args(args))
    assert not (tmp_path / 'new').exists()
    # An unsafe pickle is refused rather than executed.
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'hook': Path('x')}, evil)
    with pytest.raises(UserError, match='cannot read checkpoint'):
        read_checkpoint(str(evil))


def test_existing_run_folder_needs_overwrite(tmp_path):
    out = tmp_path / 'run'
    train(parse_args(TINY + ['--output', str(out)]))
    with pytest.raises(UserError, match='already holds a training run'):
        train(parse_args(TINY + ['--output', str(out)]))
    res = train(parse_args(TINY + ['--output', str(out), '--overwrite']))
    assert len(res.history) == 1


def test_state_checksum_sees_buffers():
    import timm
    m = timm.create_model('cifar_resnet20')
    before = state_checksum(m)
    m.bn1.running_mean += 1e-6
    assert state_checksum(m) != before


def test_cli_train_entry(tmp_path, capsys):
    from timm_layerattn.cli import main
    assert main(['train', '--model', 'cifar_resnet20', '--recipe', 'nope', '--dataset', 'digits']) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
