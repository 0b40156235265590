"""logger=tensorboard and logger=mlflow: what a run logs, read back with each tool's reader."""

from __future__ import annotations

import csv
import math

import pytest
from hydra import compose, initialize_config_dir

from fedrac.run import run_experiment
from fedrac.settings.config import ConfigError, conf_dir, validate
from tests.helpers import run_config

ROUNDS = 2


def _run(tmp_path, *overrides: str) -> list[dict]:
    run_experiment(run_config(tmp_path, "num_clients=3", f"num_rounds={ROUNDS}", *overrides))
    with open(tmp_path / "out" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tensorboard_event_files_hold_config_metrics_and_bytes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _run(tmp_path, "logger=tensorboard")
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"),
                           size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"eval/accuracy", "eval/loss", "train/loss", "bytes/up", "bytes_up/cumulative",
            "bytes_up/factors", "time/seconds", "clients/clients"} <= set(scalars)
    assert all("/" in t for t in scalars)  # grouped into sections, not flat
    assert "bytes_up/weights" not in scalars and "clients/failed" not in scalars  # always 0
    got = [(e.step, e.value) for e in acc.Scalars("eval/accuracy")]
    assert got == [(int(r["round"]), pytest.approx(float(r["eval_accuracy"]))) for r in rows]
    assert [e.step for e in acc.Scalars("bytes_up/factors")] == [1, 2]  # from its first value
    up = [e.value for e in acc.Scalars("bytes_up/cumulative")]
    assert up[-1] == sum(int(r["bytes_up"]) for r in rows)
    texts = acc.Tags()["tensors"]  # add_text is stored as a tensor summary
    assert any(t.startswith("config") for t in texts) and any(t.startswith("summary")
                                                              for t in texts)


def test_mlflow_local_store_holds_params_metrics_and_the_model(tmp_path):
    from mlflow.tracking import MlflowClient

    rows = _run(tmp_path, "logger=mlflow", "strategy=fedavg")
    client = MlflowClient(tracking_uri=(tmp_path / "out" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("fedrac")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["num_rounds"] == str(ROUNDS)
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (int(r["round"]), pytest.approx(float(r["eval_accuracy"]))) for r in rows]
    bytes_down = client.get_metric_history(run.info.run_id, "bytes_down")
    assert math.isclose(sum(m.value for m in bytes_down), sum(int(r["bytes_down"]) for r in rows))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "config.json", "summary.json", "metrics.csv"} <= artifacts


def test_a_missing_tracking_client_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=["engine=inline", "logger=mlflow"])
    with pytest.raises(ConfigError, match=r"^logger=mlflow needs the mlflow package; install "
                                          r"it: pip install 'fedrac\[mlflow\]'"):
        validate(cfg)
