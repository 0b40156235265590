"""The run's output folder: never one that holds a run (unless ``overwrite`` / ``resume``),
one sub-folder per job of a sweep, no empty folder left behind by a run that never started.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrac.settings.errors import ConfigError, _require

LOCK = ".fedrac.lock"  # held (flock) by the one process running in the folder
# What Hydra itself puts in a run folder before fedrac starts: not a run.
HYDRA_OWN = (".hydra", "fedrac.log", LOCK)
_HELD: dict[str, int] = {}  # folder -> the open lock file of this process
# What a fedrac run writes (removed first by overwrite=true; nothing else is touched).
RESULTS = ("metrics.csv", "summary.json", "model.safetensors", "curves.png", "partition.csv",
           "partition.json", "partition.png", "data.json", "spectrum.csv", "checkpoint",
           "hf_model", "adapter", "tensorboard", "mlruns")


def contents(path: str | Path) -> list[str]:
    """The entries of ``path`` other than Hydra's own (empty when it does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return [path.name] if path.exists() else []
    return sorted(p.name for p in path.iterdir() if p.name not in HYDRA_OWN)


def claim_output_dir(path: str | Path) -> None:
    """Take the folder for this process: an exclusive ``flock`` on ``<path>/.fedrac.lock``,
    held until the process ends (the kernel drops it even on SIGKILL). ``ConfigError`` when
    another process holds it: of two runs started together on one folder exactly one runs."""
    import fcntl

    folder = Path(path)
    key = str(folder.resolve())
    if key in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"output_dir={str(path)!r} is in use by another run (pid {holder});"
                          " allowed: a folder no other run is writing to") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = fd


def release_output_dir(path: str | Path) -> None:
    """Drop this process's claim on the folder (the run in it has ended)."""
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def check_output_dir(d: Mapping[str, Any]) -> None:
    """Refuse an ``output_dir`` that already holds something, unless ``overwrite=true`` or
    ``resume=<dir>`` (the resume code checks that folder itself)."""
    overwrite = d.get("overwrite", False)
    _require(isinstance(overwrite, bool), "overwrite", overwrite, "true, false")
    if overwrite or d.get("resume"):
        return
    out = d["output_dir"]
    held = contents(out)
    if held:
        shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
        raise ConfigError(f"output_dir={str(out)!r} is not empty (it holds {shown}); allowed: "
                          "a new or empty folder, overwrite=true (replace its run) or "
                          "resume=<that folder> (continue its run)")


def clear_results(path: str | Path) -> None:
    """Remove an earlier run's result files from ``path`` (``overwrite=true``), so the new
    run's files are never mixed with the old ones; other entries stay."""
    for name in RESULTS:
        p = Path(path) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def job_output_dir(output_dir: str | None, hydra_cfg: Any) -> str:
    """Where a job writes: ``output_dir`` (a single run), ``output_dir/<sweep subdir>`` (a
    job of a multirun with a fixed ``output_dir``), else Hydra's run or job folder."""
    from hydra.types import RunMode

    if output_dir is None:
        return str(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return str(Path(output_dir) / str(hydra_cfg.sweep.subdir))
    return str(output_dir)


def drop_if_unused(path: str | Path) -> None:
    """Remove ``path`` when it holds nothing but what Hydra put there (a run that failed
    before it started), and the folders above it that this leaves empty (``outputs/<date>``,
    ``outputs``)."""
    path = Path(path)
    if not path.is_dir() or contents(path):
        return
    shutil.rmtree(path, ignore_errors=True)
    date = path.parent
    if date.parent.name in ("outputs", "multirun"):  # Hydra's default layout
        for folder in (date, date.parent):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
