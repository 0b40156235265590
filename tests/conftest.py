"""Test-session setup: one torch thread (tiny models; see docs/design-notes.md)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _drop_log_handlers_a_test_added():
    """A CLI run in the test process (Hydra's job logging) adds a file handler into that
    test's folder; closed and removed after the test, so later tests never log into a
    folder that is gone."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(autouse=True)
def _restore_flwr_log_level():
    """A run in the test process (run_experiment) quiets Flower's logger; undo it after."""
    logger = logging.getLogger("flwr")
    level = logger.level
    yield
    logger.setLevel(level)
