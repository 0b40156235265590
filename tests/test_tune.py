"""tune=lr: the learning rate chosen on a validation split of the training data (never the
test split), the grid's best, tuned once per method and setting, cached, failures recorded."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from fedrac.data import load_splits, to_tensors
from fedrac.data.holdout import KEY, validation_rows
from tests.helpers import cli_error, run_config
from tests.test_cli import ROOT, fedrac

TINY = ["tune=lr", "num_clients=2", "num_rounds=2", "tune.rounds=1", "progress=lines",
        "monitor_every=0", "checkpoint_every=0"]


def test_validation_rows_are_training_rows_seeded_and_stratified(tmp_path):
    cfg = run_config(tmp_path, *TINY)
    plain = load_splits(cfg["dataset"])
    carved = load_splits({**cfg["dataset"], KEY: {"fraction": 0.2, "seed": 0}})
    x, y = to_tensors(plain.target_train)
    labels = y.numpy()
    val = validation_rows(labels, 0.2, 0)
    rest = np.setdiff1d(np.arange(len(labels)), val)
    assert len(val) == int(0.2 * len(labels)) and len(rest) + len(val) == len(labels)
    vx, vy = to_tensors(carved.target_test)
    tx, ty = to_tensors(carved.target_train)
    assert torch.equal(vx, x[val]) and torch.equal(vy, y[val])  # validation: training rows
    assert torch.equal(tx, x[rest]) and torch.equal(ty, y[rest])  # trials train on the rest
    assert len(carved.target_test) != len(plain.target_test)
    assert carved.source_train is plain.source_train  # pretraining data unchanged
    assert np.array_equal(val, validation_rows(labels, 0.2, 0))  # deterministic
    assert not np.array_equal(val, validation_rows(labels, 0.2, 1))  # seeded
    share = np.bincount(labels[val]) / np.bincount(labels)
    assert share.min() > 0.15 and share.max() < 0.25  # stratified


def _fake_runs(monkeypatch, score, calls):
    """Trials that never train: ``score(lr)`` as the validation accuracy and loss; each
    trial's config is checked to be a validation trial."""
    from fedrac import run as run_mod
    from fedrac.run import RunFailedError

    def fake(trial):
        lr = trial["client"]["lr"]
        calls.append(trial)
        assert trial["dataset"][KEY] == {"fraction": 0.2, "seed": 0}  # never the test split
        assert trial["seed"] == 0 and trial["num_rounds"] == 1 and trial["tune"]["name"] == "none"
        value = score(lr)
        if value == "diverge":
            raise RunFailedError("round 1 diverged: non-finite weights")
        if value == "crash":
            raise ValueError("out of memory")
        return {"final_accuracy": value, "final_eval_loss": value, "status": "ok"}

    monkeypatch.setattr(run_mod, "run_experiment", fake)


def test_the_grids_best_on_validation_is_chosen_and_failures_are_recorded(tmp_path,
                                                                          monkeypatch):
    from fedrac.tune import tune_lr

    cfg = run_config(tmp_path, *TINY, "seed=3", "client.lr=0.01")
    calls = []
    peak = {0.0025: 0.5, 0.005: 0.6, 0.01: "diverge", 0.02: 0.9, 0.04: "crash"}
    _fake_runs(monkeypatch, lambda lr: peak[round(lr, 6)], calls)
    out = tune_lr(cfg)
    assert [t["client"]["lr"] for t in calls] == pytest.approx([0.0025, 0.005, 0.01, 0.02, 0.04])
    assert out["client"]["lr"] == pytest.approx(0.02) and out["seed"] == 3
    result = out["tune"]["result"]
    assert result["key"] == "client.lr" and result["metric"] == "accuracy"
    assert result["lr"] == pytest.approx(0.02) and result["score"] == 0.9
    grid = {round(p["lr"], 6): p for p in result["grid"]}
    assert grid[0.01]["status"] == "failed" and "diverged" in grid[0.01]["error"]
    assert grid[0.04]["status"] == "failed" and grid[0.04]["error"] == "ValueError: out of memory"
    assert grid[0.005]["score"] == 0.6 and grid[0.005]["status"] == "ok"
    assert cfg["client"]["lr"] == 0.01  # the caller's config is left alone

    calls.clear()  # again: the failures of the run are cached, a crash of the code is not
    again = tune_lr(cfg)
    assert [round(t["client"]["lr"], 6) for t in calls] == [0.04]
    assert again["client"]["lr"] == pytest.approx(0.02)
    calls.clear()  # a config that carries its tuning (a resumed run's) is not tuned again
    assert tune_lr(again) == again and calls == []

    assert "edge" not in result  # 0.04 was tried (and failed): 0.02 is no edge of the grid
    loss_cfg = run_config(tmp_path, *TINY, "tune.metric=loss", "client.lr=0.01",
                          "tune.extend=0")
    low = tune_lr(loss_cfg)["tune"]["result"]
    assert low["lr"] == pytest.approx(0.0025)  # the lowest loss
    assert low["edge"] == "smallest"  # the grid's bottom: the optimum may lie below it


def test_a_best_at_the_grids_edge_is_searched_beyond_it(tmp_path, monkeypatch):
    """The best at the top: trials go on a grid step further (x2 here) while they improve,
    at most ``tune.extend``; at the bottom (lowest loss) the same downwards."""
    from fedrac.tune import tune_lr

    acc = {0.01: 0.5, 0.02: 0.6, 0.04: 0.7, 0.08: 0.8, 0.16: 0.75, 0.32: 0.9}
    calls = []
    _fake_runs(monkeypatch, lambda lr: acc[round(lr, 6)], calls)
    cfg = run_config(tmp_path, *TINY, "client.lr=0.01", "tune.grid=[1,2,4]")
    result = tune_lr(cfg)["tune"]["result"]
    assert [round(t["client"]["lr"], 6) for t in calls] == [0.01, 0.02, 0.04, 0.08, 0.16]
    assert result["lr"] == pytest.approx(0.08) and result["score"] == 0.8
    assert "edge" not in result  # 0.16 scored less: 0.08 is inside what was tried
    assert [p.get("extended", False) for p in result["grid"]] == [False] * 3 + [True] * 2

    calls.clear()
    short = tune_lr(run_config(tmp_path, *TINY, "client.lr=0.01", "tune.grid=[1,2,4]",
                               "tune.extend=1"))["tune"]["result"]
    assert short["lr"] == pytest.approx(0.08) and short["edge"] == "largest"  # ran out
    assert calls == []  # every trial cached, 0.08 among them

    loss = {0.01: 0.5, 0.02: 0.6, 0.04: 0.7, 0.005: 0.4, 0.0025: 0.3}
    _fake_runs(monkeypatch, lambda lr: loss[round(lr, 6)], [])
    low = tune_lr(run_config(tmp_path, *TINY, "tune.metric=loss", "client.lr=0.01",
                             "tune.grid=[1,2,4]", "cache_dir=" + str(tmp_path / "c2")))
    result = low["tune"]["result"]
    assert result["lr"] == pytest.approx(0.0025) and result["edge"] == "smallest"
    assert sorted(round(p["lr"], 6) for p in result["grid"]) == [0.0025, 0.005, 0.01, 0.02,
                                                                  0.04]


def test_every_grid_point_failing_fails_the_job_clearly(tmp_path, monkeypatch):
    from fedrac.run import RunFailedError
    from fedrac.tune import tune_lr

    cfg = run_config(tmp_path, *TINY, "tune.grid=[1,2]")
    _fake_runs(monkeypatch, lambda lr: "diverge", [])
    with pytest.raises(RunFailedError, match=r"tune=lr: every grid point failed: client.lr=0.05: "
                                              r"round 1 diverged.*; client.lr=0.1: round 1"):
        tune_lr(cfg)


def test_full_fine_tuning_tunes_full_lr(tmp_path, monkeypatch):
    from fedrac.tune import grid_lrs, lr_key, trial_config

    cfg = run_config(tmp_path, *TINY, "strategy=fedavg", "client.full_lr=0.001",
                     "tune.grid=[0.5,2]", "tune.extend=0")
    assert lr_key(cfg) == "full_lr" and grid_lrs(cfg) == [0.0005, 0.002]
    trial = trial_config(cfg, 0.002)
    assert trial["client"]["full_lr"] == 0.002 and trial["client"]["lr"] == cfg["client"]["lr"]
    plain = run_config(tmp_path, *TINY, "strategy=fedavg", "tune.relative=false",
                       "tune.grid=[0.1,0.3]")
    assert lr_key(plain) == "lr" and grid_lrs(plain) == [0.1, 0.3]  # full_lr null: lr


def test_private_trials_add_the_jobs_noise_not_a_short_runs(tmp_path):
    from fedrac.privacy.dp import settings_from_config
    from fedrac.tune import trial_config

    cfg = run_config(tmp_path, *TINY, "privacy=dp", "privacy.target_epsilon=8", "num_rounds=20",
                     "tune.rounds=2")
    trial = trial_config(cfg, 0.1)
    job = settings_from_config(cfg).noise_multiplier
    assert trial["privacy"]["noise_multiplier"] == job > 0
    assert trial["privacy"]["target_epsilon"] is None and cfg["privacy"]["target_epsilon"] == 8
    assert settings_from_config(trial).noise_multiplier == job


def test_real_trials_read_validation_data_are_cached_and_shared_by_seeds(tmp_path,
                                                                        monkeypatch):
    from fedrac import run as run_mod
    from fedrac.server import app as server_app
    from fedrac.tune import tune_lr

    seen = []
    real_load = server_app.load_splits
    monkeypatch.setattr(server_app, "load_splits",
                        lambda d: seen.append(dict(d)) or real_load(d))
    cfg = run_config(tmp_path, *TINY, "tune.grid=[0.1,1]", "tune.extend=0")
    out = tune_lr(cfg)
    assert len(seen) >= 2 and all(d.get(KEY) for d in seen)  # every trial: validation only
    points = out["tune"]["result"]["grid"]
    assert [p["status"] for p in points] == ["ok", "ok"] and not any(p["cached"] for p in points)
    best = max(points, key=lambda p: p["score"])
    assert out["client"]["lr"] == best["lr"] and points[0]["score"] != points[1]["score"]
    records = sorted((tmp_path / "cache" / "tune").glob("*.json"))
    assert len(records) == 2

    calls = []
    real_run = run_mod.run_experiment
    monkeypatch.setattr(run_mod, "run_experiment", lambda c: calls.append(c) or real_run(c))
    other_seed = run_config(tmp_path, *TINY, "tune.grid=[0.1,1]", "tune.extend=0", "seed=7")
    again = tune_lr(other_seed)
    assert calls == []  # a re-run and another seed: no trial executed
    assert again["client"]["lr"] == out["client"]["lr"] and again["seed"] == 7
    assert all(p["cached"] for p in again["tune"]["result"]["grid"])
    assert [p["score"] for p in again["tune"]["result"]["grid"]] == [p["score"] for p in points]
    tune_lr(run_config(tmp_path, *TINY, "tune.grid=[0.1,1]", "tune.extend=0", "tune.rounds=2"))
    assert len(calls) == 2  # another trial length: new trials


BAD = [
    (["tune=lr", "tune.grid=[]"], "tune.grid=[] is not allowed; allowed: a non-empty list of "
                                  "numbers > 0"),
    (["tune=lr", "tune.grid=[0.1,-1]"], "tune.grid=[0.1, -1] is not allowed; allowed: a "
                                        "non-empty list of numbers > 0"),
    (["tune=lr", "tune.grid=[0]"], "tune.grid=[0] is not allowed"),
    (["tune=lr", "tune.metric=f1"], "tune.metric='f1' is not allowed; allowed: auto, accuracy, "
                                    "loss"),
    (["tune=lr", "tune.rounds=0"], "tune.rounds=0 is not allowed; allowed: an integer >= 1"),
    (["tune=lr", "tune.extend=-1"], "tune.extend=-1 is not allowed; allowed: an integer >= 0"),
    (["tune=lr", "num_clients=1", "tune.val_fraction=0.005"],
     "tune=lr has no validation data: tune.val_fraction=0.005 of the 672 target training rows "
     "gives 3 validation rows (num_clients=1); allowed: a tune.val_fraction that leaves >= 5 "
     "validation rows (one per class)"),
    (["tune=adam"], "tune='adam' is not a known tune; allowed: lr, none"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_tune_input_stops_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    err = cli_error(args, tmp_path, monkeypatch, capsys)
    assert len(err) == 1 and err[0].startswith("fedrac: error: ") and message in err[0], err
    assert not (tmp_path / "cache").exists()  # no work was done


def _env(tmp_path):
    return {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
            "FLWR_HOME": str(tmp_path / "flwr"), "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _eval_columns(path):
    with (path / "metrics.csv").open() as f:
        return [(r["round"], r["eval_accuracy"], r["eval_loss"], r["train_loss"])
                for r in csv.DictReader(f)]


def test_cli_runs_at_the_tuned_lr_exactly_and_records_it(tmp_path):
    env = _env(tmp_path)
    tuned = fedrac(*TINY, "tune.grid=[0.5,2]", "tune.extend=0", f"output_dir={tmp_path / 'tuned'}",
                   f"hydra.run.dir={tmp_path / 'h1'}", env=env)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "tune lr 1/2: client.lr=0.025 -> val acc " in tuned.stdout + tuned.stderr
    summary = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    lr = summary["tuned_lr"]
    assert summary["config"]["client"]["lr"] == lr and summary["tune"]["lr"] == lr
    scores = {p["lr"]: p["score"] for p in summary["tune"]["grid"]}
    assert set(scores) == {0.025, 0.1} and scores[lr] == max(scores.values())
    plain = fedrac("num_clients=2", "num_rounds=2", "progress=lines", "monitor_every=0",
                   "checkpoint_every=0", f"client.lr={lr!r}", f"output_dir={tmp_path / 'plain'}",
                   f"hydra.run.dir={tmp_path / 'h2'}", env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert _eval_columns(tmp_path / "tuned") == _eval_columns(tmp_path / "plain")
    assert "tuned_lr" not in json.loads((tmp_path / "plain" / "summary.json").read_text())


def test_a_tuned_run_resumes_at_its_tuned_lr_without_tuning_again(tmp_path):
    """``resume=`` of a tune=lr run: its saved config carries the tuning; the grid is not
    tried again around the tuned rate (which also changed the run's config hash, and the
    resume was refused as another run's)."""
    env = _env(tmp_path)
    args = [a for a in TINY if not a.startswith("checkpoint_every")]
    first = fedrac(*args, "tune.grid=[0.5,2]", "tune.extend=0", f"output_dir={tmp_path / 'run'}",
                   f"hydra.run.dir={tmp_path / 'h1'}", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    lr = json.loads((tmp_path / "run" / "summary.json").read_text())["tuned_lr"]
    more = fedrac(f"resume={tmp_path / 'run'}", "num_rounds=3",
                  f"hydra.run.dir={tmp_path / 'h2'}", env=env)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "tune lr" not in more.stdout + more.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["client"]["lr"] == lr == summary["tuned_lr"]
    assert [r[0] for r in _eval_columns(tmp_path / "run")] == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_sweep_tunes_once_per_method_and_records_tuned_lr(tmp_path):
    env = _env(tmp_path)
    sweep = tmp_path / "sweep"
    proc = fedrac("-m", *TINY, "tune.grid=[0.5,2]", "tune.extend=0", "strategy=rac_lora,fedavg",
                  "seed=0,1", f"output_dir={sweep}", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "tune").glob("*.json"))) == 4  # 2 methods x 2 lrs
    with (sweep / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["tuned_lr"] for r in rows)
    for r in rows:
        grid = json.loads(r["tune"])["grid"]
        assert float(r["tuned_lr"]) == max(grid, key=lambda p: p["score"])["lr"]
    text = (sweep / "comparison.md").read_text()
    assert "Learning rates (tune=lr" in text and "| client.lr |" in text
    assert not math.isnan(float(rows[0]["final_mean"]))
