"""``tune=lr``: each method's learning rate chosen on validation data before its job runs.

Every grid value is tried on a short run (``tune.rounds``, run seed ``tune.seed``) whose
server evaluation reads a validation split carved from the target *training* rows
(:mod:`fedrac.data.holdout`: seeded, stratified, from the pooled training data before it is
partitioned); the job then runs at the best value. A trial is cached under
``<cache_dir>/tune/`` by a hash of its config, which holds neither the job's seed nor its
output folder: seeds and re-runs of one method and setting share one tuning. A failing
trial is recorded with its error; when every trial fails, the job fails. When the best
value is the grid's largest or smallest, up to ``tune.extend`` trials go on beyond it, one
grid step each, until one scores no better (or fails): short trials tend to favour the
fastest rate, and an optimum at the edge is not an optimum.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = ("auto", "accuracy", "loss")
FORMAT = 1  # of the cached trial records: bump when a trial's meaning changes
# run keys a trial sets itself: short, evaluated once at its end, nothing but its result
TRIAL_FIXED = {"monitor_every": 0, "checkpoint_every": 0, "fraction_evaluate": 0.0,
               "logger": {"name": "none"}, "progress": "lines", "verbose": False,
               "target_accuracy": None, "resume": None, "overwrite": False,
               "tune": {"name": "none"}}


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def lr_key(d: Mapping[str, Any]) -> str:
    """The ``client.*`` key the method trains with: ``full_lr`` for full fine-tuning
    (``strategy=fedavg``) when it is set, else ``lr``."""
    if d["strategy"]["name"] == "fedavg" and d["client"].get("full_lr") is not None:
        return "full_lr"
    return "lr"


def metric_of(d: Mapping[str, Any]) -> str:
    """``tune.metric`` resolved: ``auto`` is accuracy, or loss for ``task=causal_lm``."""
    m = d["tune"].get("metric", "auto")
    if m != "auto":
        return m
    return "loss" if (d.get("task") or {}).get("name") == "causal_lm" else "accuracy"


def check_tune(d: Mapping[str, Any]) -> None:
    """The ``tune`` group (ValueError, one line, before any work): the grid, the trials'
    length and metric, and a training split large enough to carve validation data from."""
    t = d.get("tune") or {"name": "none"}
    name = t.get("name", "none")
    if name not in ("none", "lr"):
        raise ValueError(f"tune={name!r} is not allowed; allowed: none, lr")
    if name == "none":
        return
    grid = t.get("grid")
    if not isinstance(grid, Sequence) or isinstance(grid, str) or not grid or not all(
            _num(g) and g > 0 for g in grid):
        raise ValueError(f"tune.grid={grid!r} is not allowed; allowed: a non-empty list of "
                         "numbers > 0 (multiples of the configured lr with tune.relative=true, "
                         "else learning rates)")
    _check(isinstance(t.get("relative", True), bool), "tune.relative", t.get("relative"),
           "true, false")
    rounds = t.get("rounds", 5)
    _check(isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1,
           "tune.rounds", rounds, "an integer >= 1 (rounds of each trial)")
    _check(t.get("metric", "auto") in METRICS, "tune.metric", t.get("metric"),
           ", ".join(METRICS) + " (on the validation split)")
    frac = t.get("val_fraction", 0.2)
    _check(_num(frac) and 0 < frac < 1, "tune.val_fraction", frac, "a number in (0, 1)")
    seed = t.get("seed", 0)
    _check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "tune.seed",
           seed, "an integer >= 0")
    extend = t.get("extend", 0)
    _check(isinstance(extend, int) and not isinstance(extend, bool) and extend >= 0,
           "tune.extend", extend, "an integer >= 0 (trials beyond the grid's edge)")
    _check(not d.get("runner"), "tune", name, f"none with an experiment that runs its own "
           f"loop ({d.get('runner')})")
    engine = d["engine"].get("name")
    _check(engine in ("inline", "simulation"), "tune", name, f"none with engine={engine} "
           "(trials run in the fedrac command: tune on engine=inline, then set client.lr)")
    check_validation_data(d)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def check_validation_data(d: Mapping[str, Any]) -> None:
    """The carve leaves one validation row per class (one row for a language model) and
    one training row per client; else the run has no validation data (ValueError)."""
    from fedrac.data import load_splits
    from fedrac.data.holdout import validation_size

    splits = load_splits(d["dataset"])
    n, frac = len(splits.target_train), float(d["tune"].get("val_fraction", 0.2))
    n_val = validation_size(n, frac)
    causal = (d.get("task") or {}).get("name") == "causal_lm"
    need = 1 if causal else splits.num_classes
    clients = int(d["num_clients"])
    if n_val < need or n - n_val < clients:
        raise ValueError(
            f"tune=lr has no validation data: tune.val_fraction={frac:g} of the {n} target "
            f"training rows gives {n_val} validation rows (num_clients={clients}); allowed: a "
            f"tune.val_fraction that leaves >= {need} validation rows "
            f"({'one' if causal else 'one per class'}) and >= {clients} training rows, more "
            "training data, or tune=none")


def grid_lrs(d: Mapping[str, Any]) -> list[float]:
    """The learning rates the trials try, in grid order (duplicates once)."""
    t = d["tune"]
    base = float(d["client"][lr_key(d)])
    lrs = [float(g) * base if t.get("relative", True) else float(g) for g in t["grid"]]
    return list(dict.fromkeys(lrs))


def trial_config(d: Mapping[str, Any], lr: float) -> dict[str, Any]:
    """The config of the trial at ``lr``: the job's, at the tuning seed, ``tune.rounds``
    long, evaluated once on the validation split carved from the training rows."""
    from fedrac.data.holdout import KEY

    t = d["tune"]
    trial = copy.deepcopy(dict(d))
    trial.update(copy.deepcopy(TRIAL_FIXED))
    rounds = min(int(t.get("rounds", 5)), int(d["num_rounds"]))
    trial.update(seed=int(t.get("seed", 0)), num_rounds=rounds, eval_every=rounds)
    trial["dataset"][KEY] = {"fraction": float(t.get("val_fraction", 0.2)),
                             "seed": int(t.get("seed", 0))}
    trial["client"][lr_key(d)] = float(lr)
    privacy = trial.get("privacy") or {}
    if privacy.get("mode", "none") != "none" and privacy.get("target_epsilon") is not None:
        from fedrac.privacy.dp import settings_from_config  # the job's noise, not a short run's

        privacy.update(noise_multiplier=settings_from_config(d).noise_multiplier,
                       target_epsilon=None)
    return trial


def trial_key(trial: Mapping[str, Any]) -> str:
    """What makes two trials the same: their config but where they are written, fedrac's
    version and the data files' stamps."""
    from importlib.metadata import PackageNotFoundError, version

    from fedrac.data import source_stamp

    try:
        v = version("fedrac")
    except PackageNotFoundError:
        v = "source"
    body = {k: val for k, val in trial.items() if k not in ("output_dir", "cache_dir")}
    text = json.dumps({"trial": body, "format": FORMAT, "fedrac": v,
                       "data": source_stamp(trial["dataset"])}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _figure(value: Any) -> float:
    return math.nan if value is None else float(value)


def _scored(record: Mapping[str, Any], metric: str, cached: bool) -> dict[str, Any]:
    """The trial ``record`` with its ``score`` on ``metric`` (no figure: failed)."""
    out = {**record, "score": _figure(record.get(metric)), "cached": cached}
    if out["status"] == "ok" and not math.isfinite(out["score"]):
        out.update(status="failed", error=f"no validation {metric} (the trial evaluated "
                   "nothing)")
    return out


def run_trial(trial: dict[str, Any], metric: str, root: Path) -> dict[str, Any]:
    """The trial's record (``status``, ``score`` on ``metric``, ``error``), from the cache or
    run now; a run that ends in a failure of its own is cached too, an exception of the code
    is not (it is tried again next time)."""
    from fedrac.atomic import write_json
    from fedrac.run import RunFailedError, run_experiment

    key = trial_key(trial)
    path = root / f"{key}.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except ValueError:
            record = {}
        if record.get("format") == FORMAT:
            return _scored(record, metric, True)
    work = root / key
    shutil.rmtree(work, ignore_errors=True)
    trial = {**trial, "output_dir": str(work)}
    record: dict[str, Any] = {"format": FORMAT, "key": key}
    keep = True
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{key}.log").open("w") as out, contextlib.redirect_stdout(out):
        try:
            summary = run_experiment(trial)
            if summary.get("interrupted"):
                raise KeyboardInterrupt
            record.update(status="ok", accuracy=_figure(summary.get("final_accuracy")),
                          loss=_figure(summary.get("final_eval_loss")))
        except RunFailedError as err:  # the trial's own outcome (diverged, no valid reply)
            record.update(status="failed", error=_line(err))
        except Exception as err:  # noqa: BLE001 - a failing grid point ends no job
            log.debug("tune trial %s failed", key, exc_info=True)
            record.update(status="failed", error=f"{type(err).__name__}: {_line(err)}")
            keep = False
    metrics = work / "metrics.csv"
    if metrics.is_file():
        shutil.copyfile(metrics, root / f"{key}.metrics.csv")
    shutil.rmtree(work, ignore_errors=True)
    if keep:
        write_json(path, record)
    return _scored(record, metric, False)


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def best_point(points: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The grid point with the best validation score (ties: the smaller lr); None when
    every point failed."""
    ok = [p for p in points if p["status"] == "ok" and math.isfinite(p["score"])]
    if not ok:
        return None
    sign = 1.0 if metric == "accuracy" else -1.0
    return max(ok, key=lambda p: (sign * p["score"], -p["lr"]))


def grid_edge(points: Sequence[Mapping[str, Any]], best: Mapping[str, Any]) -> str | None:
    """``largest`` / ``smallest`` when ``best`` is the top or bottom value the grid tried (of
    two or more; a failed value beyond it bounds the search), else ``None``: the optimum may
    lie outside the grid."""
    lrs = sorted(p["lr"] for p in points)
    if len(lrs) < 2:
        return None
    return "largest" if best["lr"] == lrs[-1] else "smallest" if best["lr"] == lrs[0] else None


def beyond(lrs: Sequence[float], edge: str) -> float:
    """The next rate past the ``largest`` / ``smallest`` of the sorted rates ``lrs`` (two or
    more), one step of the grid's outermost spacing there."""
    if edge == "largest":
        return lrs[-1] * (lrs[-1] / lrs[-2])
    return lrs[0] / (lrs[1] / lrs[0])


def _short(metric: str) -> str:
    return "acc" if metric == "accuracy" else "loss"


def tune_lr(d: Mapping[str, Any]) -> dict[str, Any]:
    """The validated run config ``d`` at its tuned learning rate (unchanged with
    ``tune=none``); ``tune.result`` records the chosen value and every grid point's score.

    Raises :class:`fedrac.run.RunFailedError` when every grid point failed.
    """
    from fedrac.run import RunFailedError

    t = d.get("tune") or {"name": "none"}
    if t.get("name", "none") == "none" or t.get("result"):
        return dict(d)  # (with a result: a resumed run's saved config, tuned already)
    key, metric = lr_key(d), metric_of(d)
    lrs = grid_lrs(d)
    root = Path(str(d["cache_dir"])).expanduser() / "tune"
    points: list[dict[str, Any]] = []

    def trial(lr: float, label: str) -> None:
        record = run_trial(trial_config(d, lr), metric, root)
        point = {"lr": lr, "status": record["status"], "score": record["score"],
                 "cached": record["cached"]}
        if record["status"] != "ok":
            point["error"] = record.get("error", "")
        points.append(point)
        shown = (f"val {_short(metric)} {point['score']:.4f}" if point["status"] == "ok"
                 else f"failed: {point.get('error')}")
        log.info("tune lr %s: client.%s=%g -> %s%s", label, key, lr, shown,
                 " (cached)" if point["cached"] else "")

    for i, lr in enumerate(lrs, 1):
        trial(lr, f"{i}/{len(lrs)}")
    for i in range(int(t.get("extend", 0))):  # the best at the grid's edge: one step beyond
        best = best_point(points, metric)
        edge = grid_edge(points, best) if best is not None else None
        if edge is None:
            break
        lr = beyond(sorted(p["lr"] for p in points), edge)
        trial(lr, f"beyond the {edge} {i + 1}/{int(t['extend'])}")
        points[-1]["extended"] = True
    best = best_point(points, metric)
    if best is None:
        raise RunFailedError("tune=lr: every grid point failed: " + "; ".join(
            f"client.{key}={p['lr']:g}: {p.get('error')}" for p in points))
    rounds = min(int(t.get("rounds", 5)), int(d["num_rounds"]))
    result = {"key": f"client.{key}", "lr": best["lr"], "metric": metric,
              "score": best["score"], "rounds": rounds,
              "val_fraction": float(t.get("val_fraction", 0.2)), "seed": int(t.get("seed", 0)),
              "grid": points}
    log.info("tune lr: client.%s=%g chosen (val %s %.4f over %d trials of %d rounds)", key,
             best["lr"], _short(metric), best["score"], len(points), rounds)
    if edge := grid_edge(points, best):
        result["edge"] = edge
        log.warning("tune lr: client.%s=%g is the %s value the grid tried: the best may lie "
                    "beyond it; extend tune.grid", key, best["lr"], edge)
    out = copy.deepcopy(dict(d))
    out["client"][key] = best["lr"]
    out["tune"] = {**t, "result": result}
    return out


def format_tuning(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison's section on tuned learning rates (markdown; empty when none)."""
    tuned = [r for r in rows if isinstance(r.get("tune"), Mapping)]
    if not tuned:
        return ""
    lines = ["Learning rates (tune=lr: each chosen on a validation split of the training "
             "data; the chosen one in bold):", "",
             "| run | key | tuned lr | validation score per lr |", "|---|---|---|---|"]
    for r in tuned:
        t = r["tune"]
        cells = []
        for p in t["grid"]:
            v = f"{_short(t['metric'])} {p['score']:.4f}" if p["status"] == "ok" else \
                f"failed ({p.get('error', '')})"
            cell = f"{p['lr']:g}: {v}"
            cells.append(f"**{cell}**" if p["lr"] == t["lr"] else cell)
        at = t.get("edge") or grid_edge(t["grid"], t)  # results written before the flag
        edge = f" (grid's {at}: extend the grid)" if at else ""
        lines.append(f"| {r['group']} | {t['key']} | {r['tuned_lr']}{edge} | "
                     f"{', '.join(cells)} |")
    return "\n".join(lines)
