import logging
import os
import warnings

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _no_leftover_files(tmp_path):
    """Run every test from its own temp dir so stray files never land in the repo."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield
    os.chdir(cwd)
