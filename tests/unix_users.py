"""Test helpers for a root-started deployment: a second Unix user, a folder it can reach."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedrac.deploy import runas
from fedrac.deploy.runas import RunAs

CAN_MAKE_USERS = os.geteuid() == 0 and shutil.which("useradd") is not None


@contextmanager
def second_user() -> Iterator[RunAs]:
    """A fresh system account (``useradd``), removed with its group at the end."""
    name = f"fedrac-t{os.getpid() % 100000}-{time.monotonic_ns() % 1000}"
    subprocess.run([*runas.USERADD, name], check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    try:
        yield RunAs(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@contextmanager
def open_dir() -> Iterator[Path]:
    """A fresh folder every account can enter (pytest's tmp folders are 0700 under root)."""
    path = Path(f"/tmp/fedrac-runas-{os.getpid()}-{time.monotonic_ns()}")
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
