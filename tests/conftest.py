import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
# The suite's models are tiny: intra-op threads only add scheduling overhead on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_leftover_files(tmp_path):
    """Run every test from its own temp dir so stray files never land in the repo."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield
    os.chdir(cwd)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """tests/real_run.py's fit (every callback on planted digits), run once for all its readers."""
    from tests.real_run import real_run as fit

    root = tmp_path_factory.mktemp("real_run")
    cwd = os.getcwd()
    os.chdir(root)  # like every test: stray files never land in the repo
    try:
        return fit(root)
    finally:
        os.chdir(cwd)
