"""`timm-layerattn bench` machinery (not timings: those are benchmarks, see benchmarks/README.md): the training
rows, the plain-autograd comparison rows and the depth-sweep plot."""
import math

import pytest
import torch

from timm_layerattn.tools.bench import (
    PLAIN_AUTOGRAD_SUFFIX, BenchConfig, benchmark, format_results, plot_depth_sweep, timm_factory)


@pytest.mark.parametrize('name', ['cifar_resnet20_kcla', 'cifar_resnet20_mrlab'])
def test_training_rows_and_plain_autograd_rows(name):
    """Every row gets inference, training and memory numbers; the plain-autograd row of a layer-attention model
    keeps more activation memory than the same model on the memory-lean path, the baseline's ratio is 1."""
    cfg = BenchConfig(batch_size=2, img_size=32, threads=None, repeats=1, warmup=1, train_repeats=1)
    factories = {'cifar_resnet20': timm_factory('cifar_resnet20'), name: timm_factory(name),
                 name + PLAIN_AUTOGRAD_SUFFIX: timm_factory(name, plain_autograd=True)}
    results = {r.name: r for r in benchmark(factories, cfg, baseline='cifar_resnet20', log=lambda s: None)}
    for r in results.values():
        assert all(math.isfinite(v) and v > 0 for v in (r.infer_ms, r.train_ms, r.act_mb)), r
    assert results['cifar_resnet20'].ratios == pytest.approx({'infer': 1., 'train': 1., 'mem': 1.})
    assert results[name].act_mb < results[name + PLAIN_AUTOGRAD_SUFFIX].act_mb
    table = format_results(list(results.values()), cfg, 'cifar_resnet20')
    assert 'memory-lean autograd Functions' in table and f'<model>{PLAIN_AUTOGRAD_SUFFIX}' in table


def test_depth_sweep_plot_has_inference_training_and_memory_panels(tmp_path):
    import matplotlib.image
    sweep = {'KCLA': [(20, 1.2, 1.3, 1.4), (56, 1.1, 1.2, 1.3)], 'MRLA-B': [(20, 1.3, 1.4, 1.2), (56, 1.6, 1.7, 1.3)]}
    path = tmp_path / 'sweep.png'
    plot_depth_sweep(sweep, str(path), 'test')
    image = matplotlib.image.imread(str(path))
    assert image.shape[1] > 2.5 * image.shape[0]  # three panels side by side
    assert torch.tensor(image).float().std() > 0
