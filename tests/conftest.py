"""Test-session setup: one torch thread (tiny models; see docs/design-notes.md)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_flwr_log_level():
    """A run in the test process (run_experiment) quiets Flower's logger; undo it after."""
    logger = logging.getLogger("flwr")
    level = logger.level
    yield
    logger.setLevel(level)
