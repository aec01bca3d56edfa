"""Shared fixtures: where the real datasets live."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# <repo>/tests/conftest.py -> <repo>/../shared/datasets, the layout of the project's workspace.
_DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root holding ``mnist/`` and ``fashion-mnist/``: $ELASTICZO_DATA, else ``<repo>/../shared/datasets``.

    Skips (rather than fails) only when that directory does not exist at all, so a checkout
    without the shared data still runs every other test; a directory with damaged files fails.
    """
    env = os.environ.get("ELASTICZO_DATA", "")
    root = Path(env).expanduser() if env else _DEFAULT_DATA
    if not root.is_dir():
        pytest.skip(f"dataset root {root} does not exist (set ELASTICZO_DATA to point at it)")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (the bench's setting): on a busy 2-core machine, 2 threads
    run small steps ~50x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
