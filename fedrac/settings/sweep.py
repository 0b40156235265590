"""A multirun that survives a bad job: every job validated before the first starts (all
errors listed together), identical jobs run once, a job failing at run time is recorded
(``failure.json``, then the comparison) and the sweep goes on.

Identical means the same validated config once the keys its strategy ignores are left
out (``IGNORED_KEYS`` on the strategy class: ``strategy=fedavg,rac_lora strategy.rank=1,4``
runs fedavg once). Hooked into Hydra as :class:`SweepGuard` (``hydra.callbacks``) and
:func:`run_job` (the multirun task function's body).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from fedrac.atomic import write_json
from fedrac.settings.errors import ConfigError

log = logging.getLogger(__name__)

# The sweep in progress (the basic launcher runs every job in this process):
# job overrides -> the overrides of the identical job that runs instead; failed jobs.
_STATE: dict[str, Any] = {"twins": {}, "failed": []}
FAILURE = "failure.json"


def failed_jobs() -> list[str]:
    """One line per job of the latest sweep that failed (empty: none, or no sweep)."""
    return list(_STATE["failed"])


def sweep_jobs(config: DictConfig, loader: Any) -> list[list[str]]:
    """The override list of every job of the multirun ``config`` (sweeper params included)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()]
    args += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(args)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None)
            for job in batch]


def identity(d: Mapping[str, Any]) -> str:
    """What makes two validated configs the same run: everything but the output folder,
    the overwrite/resume switches and the keys the strategy ignores."""
    from strategies import STRATEGIES

    d = {k: v for k, v in d.items() if k not in ("output_dir", "overwrite", "resume")}
    s = dict(d["strategy"])
    for key in getattr(STRATEGIES.get(s.get("name")), "IGNORED_KEYS", ()):
        s.pop(key, None)
    return json.dumps({**d, "strategy": s}, sort_keys=True, default=str)


def check_jobs(config: DictConfig, loader: Any) -> tuple[list[list[str]], list[str]]:
    """Validate every job of the multirun: ``(jobs, errors)``; identical jobs are noted
    (the later one is skipped when it comes)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedrac.settings.config import validate
    from fedrac.settings.hydra_errors import one_line

    jobs = sweep_jobs(config, loader)
    errors: list[str] = []
    seen: dict[str, list[str]] = {}
    _STATE["twins"], _STATE["failed"] = {}, []
    for num, job in enumerate(jobs):
        try:
            cfg = loader.load_sweep_config(config, job)
            with open_dict(cfg):
                del cfg["hydra"]
            d = validate(cfg)
        except ConfigError as err:
            errors.append(f"job {num} ({' '.join(job)}): {err}")
            continue
        except (HydraException, OmegaConfBaseException) as err:
            errors.append(f"job {num} ({' '.join(job)}): {one_line(err, job)}")
            continue
        key = identity(d)
        if key in seen:
            _STATE["twins"][tuple(job)] = seen[key]
        else:
            seen[key] = job
    out = config.get("output_dir")
    if out is not None:
        from fedrac.server.outputs import contents

        held = contents(out)
        if held and not config.get("overwrite") and not config.get("resume"):
            errors.append(f"output_dir={str(out)!r} is not empty (it holds "
                          f"{', '.join(held[:4])}); allowed: a new or empty folder (each job "
                          "gets a sub-folder), overwrite=true")
    return jobs, errors


class SweepGuard(Callback):
    """Hydra callback: check every job before the first starts; drop skipped twins' folders."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        jobs, errors = check_jobs(config, GlobalHydra.instance().config_loader())
        if errors:
            for line in errors:
                print(f"fedrac: error: {line}", file=sys.stderr)
            print(f"fedrac: error: {len(errors)} of {len(jobs)} jobs cannot run; nothing was "
                  "started", file=sys.stderr, flush=True)
            raise SystemExit(2)
        twins = len(_STATE["twins"])
        if twins:
            print(f"fedrac: {len(jobs)} jobs, {twins} identical to another (the strategy "
                  f"ignores the override): {len(jobs) - twins} run", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Jobs run by a launcher in other processes left only their ``failure.json``."""
        if _STATE["failed"]:
            return
        where = Path(config.get("output_dir") or config.hydra.sweep.dir)
        records = [r for p in sorted(where.iterdir()) if p.is_dir() and (r := load_failure(p))
                   ] if where.is_dir() else []
        _STATE["failed"] = [f"{r['job']} ({r['overrides']}): {r['failure']}" for r in records]

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        job = tuple(config.hydra.overrides.task)
        if job in _STATE["twins"]:  # it never ran: no folder of its own
            shutil.rmtree(config.hydra.runtime.output_dir, ignore_errors=True)
        elif config.get("output_dir") is not None:  # it ran in output_dir/<job>, .hydra too
            from fedrac.server.outputs import drop_if_unused

            drop_if_unused(config.hydra.runtime.output_dir)


def _reason(err: BaseException) -> str:
    from fedrac.run import RunFailedError

    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(err, ConfigError | RunFailedError):
        return first
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def run_job(cfg: DictConfig, prepare: Callable[[DictConfig], dict[str, Any]],
            run: Callable[[dict[str, Any]], float]) -> float:
    """One job of a multirun: skipped when identical to an earlier one; a failure is
    written to ``failure.json`` in its folder and recorded, and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job = tuple(hc.overrides.task)
    twin = _STATE["twins"].get(job)
    if twin is not None:
        print(f"fedrac: job {hc.job.num} ({' '.join(job)}) is the same run as "
              f"({' '.join(twin)}): skipped", flush=True)
        return math.nan
    out = Path(hc.runtime.output_dir)
    try:
        run_cfg = prepare(cfg)
        out = Path(run_cfg["output_dir"])
        if out != Path(hc.runtime.output_dir):  # a fixed output_dir: the job's overrides too
            shutil.copytree(Path(hc.runtime.output_dir) / ".hydra", out / ".hydra",
                            dirs_exist_ok=True)
        return run(run_cfg)
    except Exception as err:  # noqa: BLE001 - one job's failure ends no sweep
        from fedrac.run import RunFailedError

        reason = _reason(err)
        if not isinstance(err, ConfigError | RunFailedError):
            log.exception("job %s failed", hc.job.num)  # the traceback, in the job's log
        write_json(out / FAILURE, {"status": "failed", "failure": reason,
                                   "overrides": list(job)})
        line = f"job {hc.job.num} ({' '.join(job)}): {reason}"
        _STATE["failed"].append(line)
        print(f"fedrac: error: {line}; the sweep goes on", file=sys.stderr, flush=True)
        return math.nan


def load_failure(path: Path) -> dict[str, Any] | None:
    """The failure record of the job in ``path`` (``failure.json``, or a summary marked
    failed), or None."""
    for name in (FAILURE, "summary.json"):
        f = path / name
        if f.is_file():
            try:
                record = json.loads(f.read_text())
            except ValueError:
                continue
            if record.get("status") == "failed":
                overrides = record.get("overrides")
                if overrides is None:
                    o = path / ".hydra" / "overrides.yaml"
                    overrides = [str(x) for x in OmegaConf.load(o)] if o.is_file() else []
                return {"job": path.name, "overrides": " ".join(overrides),
                        "status": "failed", "failure": record.get("failure", "")}
    return None


def failure_lines(records: Sequence[Mapping[str, Any]]) -> str:
    """The comparison's section on failed jobs (markdown)."""
    if not records:
        return ""
    return "\n".join(["Failed jobs:", ""] + [f"- {r['job']} ({r['overrides']}): status: "
                                              f"failed, {r['failure']}" for r in records])
