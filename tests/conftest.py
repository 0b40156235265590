"""Test-session setup: one torch thread (tiny models; see README "Performance")."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _flower_log_level():
    """In-process runs quiet Flower's logger (``fedrac.run.quiet_flower``); restore its level
    so that tests reading Flower's log do not depend on the order tests run in."""
    logger = logging.getLogger("flwr")
    level = logger.level
    yield
    logger.setLevel(level)
