"""Any input size: official code fails on some (CIFAR AvgPool2d(8), KCLA with dilation); ours must not."""
import pytest
import timm
import torch

import timm_layerattn  # noqa: F401

IMAGENET = ['resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab']
CIFAR = ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab', 'cifar_resnet20']


@pytest.fixture(scope='module')
def imagenet_models():
    return {n: timm.create_model(n).eval() for n in IMAGENET}


@pytest.mark.parametrize('hw', [(32, 32), (33, 33), (97, 131), (225, 225), (256, 320)])
@pytest.mark.parametrize('name', IMAGENET)
def test_imagenet_models_any_size(imagenet_models, name, hw):
    model = imagenet_models[name]
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', IMAGENET)
def test_detection_sized_input_features(imagenet_models, name):
    model = imagenet_models[name]
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 800, 1216), indices=[1, 2, 3, 4], intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize('hw', [(8, 8), (9, 13), (28, 28), (33, 47), (61, 64)])
@pytest.mark.parametrize('name', CIFAR)
def test_cifar_models_any_size(name, hw):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_cifar_global_pool_equals_official_avgpool8_at_32px():
    model = timm.create_model('cifar_resnet20_kcla').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feat = model.forward_features(x)
        official = model.fc(torch.nn.functional.avg_pool2d(feat, 8).flatten(1))
        torch.testing.assert_close(model(x), official)
