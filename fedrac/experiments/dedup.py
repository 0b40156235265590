"""A multirun runs each distinct job once.

A sweep such as ``-m strategy=fedavg,rac_lora strategy.rank=1,4`` makes two ``fedavg`` jobs
that differ only in keys fedavg never reads. The second one gets the first one's result
files (copied, so every job folder stays complete for the comparison) instead of a run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# strategy keys full fine-tuning ignores (it trains no adapters; see config.check_strategy)
IGNORED_BY_FEDAVG = ("rank", "alpha", "sketch", "train_factor", "resample_every", "download")
NOT_COPIED = {".hydra"}  # Hydra's own record of the job (its overrides), and the job's log

_seen: dict[str, str] = {}  # effective-config key -> output folder of the job that ran it


def effective_key(cfg: Mapping[str, Any], sweep: str) -> str:
    """What decides a job's result: the validated config without its output folder and
    without the strategy keys the strategy ignores, within one sweep folder."""
    d = {k: v for k, v in cfg.items() if k != "output_dir"}
    strategy = dict(d["strategy"])
    if strategy.get("name") == "fedavg":
        for key in IGNORED_BY_FEDAVG:
            strategy.pop(key, None)
    d["strategy"] = strategy
    return json.dumps({"sweep": sweep, "config": d}, sort_keys=True, default=str)


def earlier_job(cfg: Mapping[str, Any], sweep: str) -> Path | None:
    """The output folder of an earlier job of this sweep with the same effective config (its
    results complete), or None, remembering this job. Runs with a tracker are never skipped
    (each job keeps its own tracked run)."""
    logger = cfg.get("logger") or {}
    if logger.get("name", "none") != "none":
        return None
    key = effective_key(cfg, sweep)
    src = _seen.get(key)
    if src and (Path(src) / "summary.json").is_file():
        return Path(src)
    _seen[key] = str(cfg["output_dir"])
    return None


def reuse(src: Path, dst: str | Path) -> dict[str, Any]:
    """Copy the results of ``src`` into ``dst`` (not Hydra's files or logs); its summary."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in NOT_COPIED or item.suffix == ".log":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)
    return json.loads((dst / "summary.json").read_text())
