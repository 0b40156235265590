"""Experiment tracking: a run's config, per-round metrics, bytes and final model, logged to
TensorBoard or MLflow as well as to the run folder (the ``logger`` config group).

- ``logger=none`` (default): the run folder only;
- ``logger=tensorboard``: event files in ``<output_dir>/<logger.dir>`` (``tensorboard
  --logdir`` on it): every ``metrics.csv`` column as a scalar per round, cumulative bytes,
  the config and the summary as text;
- ``logger=mlflow``: a run in ``logger.experiment`` of the tracking store
  ``logger.tracking_uri`` (default: a local file store in ``<output_dir>/mlruns``): the
  config as parameters (flattened) and ``config.json``, the same metrics per round, and
  ``model.safetensors``, ``summary.json``, ``metrics.csv`` and the plots as artifacts.

Both clients are optional installs (``pip install 'fedrac[tensorboard]'`` /
``'fedrac[mlflow]'``); :func:`check_logger` names the command when one is missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrac.settings.typed import Settings

log = logging.getLogger(__name__)

LOGGERS = ("none", "tensorboard", "mlflow")
_NEEDS = {"tensorboard": ("tensorboard", "pip install 'fedrac[tensorboard]' (or tensorboard)"),
          "mlflow": ("mlflow", "pip install 'fedrac[mlflow]' (or mlflow-skinny)")}
_FILES = ("model.safetensors", "summary.json", "metrics.csv", "curves.png", "partition.png",
          "data.json")  # artifacts, when present


def logger_name(logger: Mapping[str, Any] | None) -> str:
    """The name in the ``logger`` group (``none`` when the group is absent)."""
    return str((logger or {}).get("name") or "none")


def check_logger(logger: Mapping[str, Any] | None) -> str | None:
    """Why the ``logger`` group's logger cannot work (unknown, or its client not installed),
    or None."""
    name = logger_name(logger)
    if name not in LOGGERS:
        return f"logger={name!r} is not a logger; allowed: {', '.join(LOGGERS)}"
    if name in _NEEDS and importlib.util.find_spec(_NEEDS[name][0]) is None:
        return f"logger={name} needs the {_NEEDS[name][0]} package; install it: {_NEEDS[name][1]}"
    return None


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"strategy": {"rank": 1}} -> {"strategy.rank": "1"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def round_scalars(row: Mapping[str, Any], totals: dict[str, float]) -> dict[str, float]:
    """A ``metrics.csv`` row's finite numbers, plus cumulative bytes (``totals`` carries them)."""
    for d in ("up", "down"):
        totals[d] = totals.get(d, 0.0) + float(row.get(f"bytes_{d}", 0) or 0)
    out = {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, int | float)
           and math.isfinite(float(v))}
    out["bytes_up_cumulative"], out["bytes_down_cumulative"] = totals["up"], totals["down"]
    return out


_GROUPS = (("client_eval_", "client_eval/"), ("eval_", "eval/"), ("train_", "train/"),
           ("bytes_up_", "bytes_up/"), ("bytes_down_", "bytes_down/"), ("bytes_", "bytes/"))
_TIME = ("seconds", "client_seconds")
_PRIVACY = ("epsilon", "clip_norm", "secagg_error_bound")


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.csv column, grouped into sections (``eval/accuracy``,
    ``bytes_up/factors``, ``time/seconds``, ``clients/failed``, ``privacy/epsilon``)."""
    for prefix, section in _GROUPS:
        if key.startswith(prefix):
            return section + key[len(prefix):]
    if key in _TIME:
        return f"time/{key}"
    if key in _PRIVACY:
        return f"privacy/{key}"
    return f"clients/{key}"


def _quiet_until_nonzero(key: str) -> bool:
    """Per-kind bytes and failure counts: logged from their first non-zero value on."""
    return key.startswith(("bytes_up_", "bytes_down_")) and not key.endswith("_cumulative") \
        or key in ("failed", "rejected")


class Tracker:
    """Receives what the run folder gets; the base class logs nothing (``logger=none``)."""

    def start(self, settings: Settings) -> None:
        """Log the resolved config."""

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        """Log one round's metrics and bytes."""

    def finish(self, summary: Mapping[str, Any], out_dir: Path) -> None:
        """Log the summary and the final model; close."""


class TensorBoardTracker(Tracker):
    """Event files under ``<output_dir>/<logger.dir>``."""

    def __init__(self, out_dir: Path, logger_cfg: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = out_dir / str(logger_cfg.get("dir") or "tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.seen: set[str] = set()  # keys logged so far (zero kinds wait for a first value)

    def start(self, settings: Settings) -> None:
        text = json.dumps(settings.config, indent=2, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            if value == 0 and key not in self.seen and _quiet_until_nonzero(key):
                continue
            self.seen.add(key)
            self.writer.add_scalar(tb_tag(key), value, server_round)
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any], out_dir: Path) -> None:
        text = json.dumps(summary, indent=2, default=str)
        self.writer.add_text("summary", "```\n" + text + "\n```", int(summary.get("rounds", 0)))
        self.writer.add_text("model", str(out_dir / "model.safetensors"),
                             int(summary.get("rounds", 0)))
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per fedrac run (file store in the output folder by default)."""

    def __init__(self, out_dir: Path, logger_cfg: Mapping[str, Any], verbose: bool) -> None:
        uri = logger_cfg.get("tracking_uri")
        if not uri:
            # MLflow keeps its file store in maintenance mode behind this switch; a local
            # store in the run folder needs no server and no database migration (seconds)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out_dir / "mlruns").resolve().as_uri()
        if not verbose:
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = str(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = str(logger_cfg.get("experiment") or "fedrac")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_name = logger_cfg.get("run_name")
        self.experiment = experiment
        self.log_model = bool(logger_cfg.get("log_model", True))
        self.run_id: str | None = None

    def start(self, settings: Settings) -> None:
        from mlflow.entities import Param

        cfg = settings.config  # logged as it was resolved
        out = str(settings.run.output_dir or "")
        label = self.run_name or f"{settings.strategy.name} {Path(out).name}".strip()
        run = self.client.create_run(self.experiment, run_name=str(label),
                                     tags={"fedrac.output_dir": out})
        self.run_id = run.info.run_id
        params = [Param(k[:250], v[:6000]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, dict(cfg), "config.json")

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, server_round) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: Mapping[str, Any], out_dir: Path) -> None:
        for name in _FILES:
            path = out_dir / name
            if path.is_file() and (self.log_model or name != "model.safetensors"):
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


def make_tracker(settings: Settings, out_dir: str | Path) -> Tracker:
    """The tracker the ``logger`` group names, started with the run's config."""
    logger_cfg = settings.run.logger
    problem = check_logger(logger_cfg)
    if problem:
        raise RuntimeError(problem)
    name = logger_name(logger_cfg)
    out = Path(out_dir)
    if name == "tensorboard":
        tracker: Tracker = TensorBoardTracker(out, logger_cfg)
    elif name == "mlflow":
        tracker = MLflowTracker(out, logger_cfg, settings.run.verbose)
    else:
        tracker = Tracker()
    tracker.start(settings)
    return tracker
