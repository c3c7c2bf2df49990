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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """48 synthetic identities at 32 px (train.rec/.idx, val.bin, probe set), made once per session."""
    from dcq.data import synthesize

    out = tmp_path_factory.mktemp("synth") / "tiny"
    synthesize(out, profile="ms1m", identities=48, image_size=32, fmt="rec", seed=0, progress=False)
    return out
