"""Test-session setup: one torch thread (tiny models; see README "Performance")."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)
