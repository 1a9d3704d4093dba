import os

import pytest
import torch

# Two cores per CI machine: one intra-op thread per xdist worker avoids oversubscription.
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
