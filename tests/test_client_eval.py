"""Client-side evaluation: evaluate messages to a seeded sample, weighted means, spread, bytes."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from fedrac.data import partition, to_tensors
from fedrac.models import build_model
from fedrac.run import run_experiment
from fedrac.settings.config import ConfigError
from fedrac.training.local import evaluate
from strategies.base import client_eval_metrics
from tests.helpers import run_config


def _cfg(tmp_path, *overrides: str) -> dict:
    return run_config(tmp_path, "num_clients=4", "num_rounds=2", *overrides)


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_client_eval_metrics_are_weighted_means_with_spread():
    m = client_eval_metrics([(1.0, {"loss": 1.0, "accuracy": 0.5}),
                             (3.0, {"loss": 2.0, "accuracy": 1.0})])
    assert m["client_eval_loss"] == pytest.approx(1.75)
    assert m["client_eval_accuracy"] == pytest.approx(0.875)
    assert m["client_eval_accuracy_min"] == 0.5 and m["client_eval_accuracy_max"] == 1.0
    assert m["client_eval_loss_std"] == pytest.approx(0.5)  # across clients, unweighted
    assert m["client_eval_clients"] == 2
    # a task without accuracy (loss only) gets loss columns only
    assert "client_eval_accuracy" not in client_eval_metrics([(2.0, {"loss": 0.3})])


def test_tiny_run_evaluates_on_every_clients_validation_share(tmp_path):
    cfg = _cfg(tmp_path, "strategy=fedavg", "fraction_evaluate=1.0", "partitioner=iid",
               "partitioner.val_fraction=0.25")
    run_experiment(cfg)
    rows = _rows(tmp_path / "out" / "metrics.csv")
    assert rows[0]["client_eval_loss"] == ""  # round 0: server-side evaluation only
    last = rows[-1]
    assert int(last["client_eval_clients"]) == 4
    assert int(last["bytes_down_eval"]) > 0 and int(last["bytes_up_eval"]) > 0
    # bytes: the full weights to 4 clients, besides the training download
    assert int(last["bytes_down_eval"]) == pytest.approx(int(last["bytes_down_weights"]), rel=0.01)
    # the same figures computed here from the final model and the clients' validation shares
    from fedrac.data import load_splits

    task = load_splits(cfg["dataset"])
    model = build_model(cfg["model"], task.input_shape, task.num_classes)
    model.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    results = []
    for pid in range(4):
        x, y = to_tensors(partition(cfg["dataset"], cfg["partitioner"], 4, pid, 0, "val"))
        train_x, _ = to_tensors(partition(cfg["dataset"], cfg["partitioner"], 4, pid, 0))
        assert 0 < len(y) < len(train_x)  # the validation share, not the training data
        loss, acc = evaluate(model, x, y, torch.device("cpu"))
        results.append((float(len(y)), {"loss": loss, "accuracy": acc}))
    expected = client_eval_metrics(results)
    for key in ("client_eval_loss", "client_eval_accuracy", "client_eval_accuracy_min",
                "client_eval_accuracy_max", "client_eval_loss_std"):
        assert float(last[key]) == pytest.approx(expected[key], rel=1e-5), key
    assert not math.isnan(float(last["client_eval_accuracy"]))


def test_client_eval_samples_a_fraction_every_eval_every_rounds(tmp_path):
    cfg = _cfg(tmp_path, "strategy=rac_lora", "fraction_evaluate=0.5", "eval_every=2",
               "num_rounds=3")
    run_experiment(cfg)
    rows = {int(r["round"]): r for r in _rows(tmp_path / "out" / "metrics.csv")}
    assert rows[1]["client_eval_clients"] == "" and int(rows[1]["bytes_down_eval"]) == 0
    assert int(rows[2]["client_eval_clients"]) == 2  # half of 4, seeded
    assert int(rows[3]["client_eval_clients"]) == 2  # the last round always evaluates


def test_client_eval_is_off_by_default_and_checked(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg["fraction_evaluate"] == 0.0
    with pytest.raises(ConfigError, match=r"^fraction_evaluate=1.5 is not allowed; allowed: "
                                          r"a number in \[0, 1\]"):
        _cfg(tmp_path, "fraction_evaluate=1.5")

