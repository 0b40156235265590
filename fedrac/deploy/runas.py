"""The unprivileged account a root-started deployment runs its nodes and apps as.

When ``deploy up`` is started by root, the SuperNodes, the ClientApp/ServerApp processes
Flower starts and the node workers run as ``--run-as USER`` (default ``fedrac``); the kernel
does the switch (``subprocess.Popen(user=, group=, extra_groups=[])`` and util-linux
``setpriv``), fedrac only chooses the ids. Not root: nothing changes, every process runs as
the caller.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "fedrac"
USERADD = ("useradd", "--system", "--user-group", "--no-create-home",
           "--shell", "/usr/sbin/nologin")


class RunAsError(RuntimeError):
    """``--run-as`` names no usable account, or a folder is out of that account's reach."""


@dataclass(frozen=True)
class RunAs:
    """An account to drop to: its name, uid and primary gid."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict:
        """``subprocess.Popen`` arguments that start a child as this account, no extra groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def setpriv(self) -> list[str]:
        """An argv prefix that runs the rest as this account (util-linux ``setpriv``)."""
        exe = shutil.which("setpriv") or "setpriv"
        return [exe, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]

    def can_reach(self, path: str | Path, write: bool = False) -> bool:
        """Whether this account can read (and with ``write``, write) ``path``, enter it if
        it is a folder, run it if it is an executable: asked of the kernel by ``test`` run
        as the account."""
        p = str(path)
        run = Path(path).is_dir() or os.access(path, os.X_OK)
        flags = ["-r", p] + (["-a", "-x", p] if run else []) + (["-a", "-w", p] if write else [])
        test = shutil.which("test") or "/usr/bin/test"
        return subprocess.run([test, *flags], cwd="/", env={}, check=False,
                              **self.popen_kwargs()).returncode == 0

    def require(self, path: str | Path, write: bool = False) -> None:
        """RunAsError (one line) unless this account can read (and write) ``path``."""
        if not self.can_reach(path, write):
            need = "writable" if write else "readable"
            real = os.path.realpath(path)
            where = f" (real path {real})" if real != os.path.abspath(path) else ""
            raise RunAsError(f"{path} is not {need} by user {self.name}: chown/chmod it"
                             f"{where}; every folder above it needs o+x")

    def own(self, path: str | Path, mode: int = 0o700) -> Path:
        """Create ``path`` (a folder) if needed, give it to this account with ``mode``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        os.chown(p, self.uid, self.gid)
        p.chmod(mode)
        return p


def resolve(user: str | None = DEFAULT_USER, create: bool = False) -> RunAs | None:
    """The account to drop to, or ``None`` when this process is not root (nothing changes)
    or ``user`` is ``None`` (Python callers only: keep this account; the command line always
    names one).

    A missing ``user`` is created (a system account without login shell or home) only with
    ``create``; else RunAsError naming the option and the ``useradd`` line.
    """
    if os.geteuid() != 0 or user is None:
        return None
    name = user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise RunAsError(
                f"run_as user {name!r} does not exist; create it "
                f"({' '.join(USERADD)} {name}), pass --create-user, or name another "
                "account with --run-as USER") from None
        res = subprocess.run([*USERADD, name], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RunAsError(f"useradd {name} failed: {res.stderr.strip()[-300:]}") from None
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise RunAsError(f"--run-as={name!r} is not allowed: it has uid or gid 0; allowed: "
                         "an unprivileged account")
    return RunAs(name, entry.pw_uid, entry.pw_gid)
