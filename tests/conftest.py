import os

import pytest
import torch

# Two cores per CI machine: one intra-op thread per xdist worker avoids oversubscription.
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def ops():
    """`torch.ops.timm_layerattn` with the fused CPU kernels built; skips where no C++ compiler exists."""
    from timm_layerattn.layers import native
    if native._compiler() is None:
        pytest.skip('no C++ compiler on this machine: the kernels cannot be built (the PyTorch path is used)')
    assert native.available(), native.last_error()
    return torch.ops.timm_layerattn
