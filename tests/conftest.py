import os

import pytest
import torch

# Tests are small; one thread keeps them fast and deterministic on a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)
