"""Tables standardised from the training split; NaN / infinite features refused or handled."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from hydra import compose, initialize_config_dir

from clients.handlers import client_data
from fedrac.data import build_splits, load_dataset_from_path, to_tensors
from fedrac.data.sources import DataConfigError
from fedrac.settings.config import ConfigError, conf_dir, validate
from tests.helpers import settings_with

AUTO = {"name": "files", "test_fraction": 0.25, "split_seed": 0, "mean": "auto",
        "std": "auto"}


def _write(path, rows, header=("a", "b", "label")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _scaled_table(tmp_path, n=80, name="t.csv"):
    rng = np.random.default_rng(0)
    a = rng.normal(1000.0, 300.0, n)  # proline-like scale
    b = rng.normal(0.3, 0.1, n)
    return _write(tmp_path / name, [(a[i], b[i], i % 3) for i in range(n)]), np.stack([a, b], 1)


def _rows_of(rows: np.ndarray, table: np.ndarray) -> bool:
    """Every row of ``rows`` is a row of ``table`` (up to float32 rounding)."""
    return all(np.min(np.max(np.abs(table - r) / np.abs(table), axis=1)) < 1e-5 for r in rows)


def _x(ds) -> np.ndarray:
    return to_tensors(ds)[0].numpy().astype(np.float64)


def test_auto_standardises_tables_with_the_training_splits_statistics(tmp_path):
    path, raw = _scaled_table(tmp_path)
    task = build_splits({**AUTO, "path": path})
    train, test = _x(task.target_train), _x(task.target_test)
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(0), 1.0, atol=1e-5)
    stats = task.standardisation
    assert stats.auto and stats.rows == len(train) and stats.columns == ["a", "b"]
    # the statistics are the training rows' own: recover the raw rows with them
    back = train * np.array(stats.std) + np.array(stats.mean)
    assert _rows_of(back, raw)
    # the test split is transformed with the training statistics, not its own
    assert not np.allclose(test.mean(0), 0.0, atol=1e-3)
    back = test * np.array(stats.std) + np.array(stats.mean)
    assert _rows_of(back, raw)


def test_images_keep_their_behaviour_under_auto():
    plain_task = build_splits({"name": "digits", "source_classes": [0, 1, 2, 3, 4],
                             "target_classes": [5, 6, 7, 8, 9]})
    auto_task = build_splits({"name": "digits", "source_classes": [0, 1, 2, 3, 4],
                            "target_classes": [5, 6, 7, 8, 9], "mean": "auto", "std": "auto"})
    np.testing.assert_array_equal(_x(plain_task.target_train), _x(auto_task.target_train))
    assert auto_task.standardisation.wire() == {} and auto_task.standardisation.mean is None


def test_a_constant_column_is_left_centred_not_divided_by_zero(tmp_path):
    path = _write(tmp_path / "c.csv", [(5.0, float(i), i % 2) for i in range(20)])
    task = build_splits({**AUTO, "path": path})
    x = _x(task.target_train)
    assert np.all(x[:, 0] == 0.0) and task.standardisation.std[0] == 1.0


def test_nan_and_infinite_values_are_refused_with_rows_and_column(tmp_path):
    rows = [(float(i), float(i), i % 2) for i in range(10)]
    rows[3] = (3.0, "nan", 1)
    rows[7] = ("inf", 7.0, 1)
    path = _write(tmp_path / "n.csv", rows)
    with pytest.raises(DataConfigError, match=r"^dataset.path='.*n.csv': 2 of 10 rows have NaN "
                                              r"or infinite feature values \(first: row 3 "
                                              r"\(0-based\), column 'b'\); allowed: finite "
                                              r"values, or dataset.nan=drop"):
        build_splits({**AUTO, "path": path})
    dropped = build_splits({**AUTO, "path": path, "nan": "drop"})
    assert len(dropped.target_train) + len(dropped.target_test) == 8
    zero = build_splits({**AUTO, "path": path, "nan": "zero", "test_fraction": 0.2})
    x = np.concatenate([_x(zero.target_train), _x(zero.target_test)])
    assert np.isfinite(x).all() and (x == 0.0).sum() >= 2  # the training mean
    with pytest.raises(DataConfigError, match=r"dataset.nan='fill' is not allowed; allowed: "
                                              r"error, drop, zero"):
        build_splits({**AUTO, "path": path, "nan": "fill"})


def test_nan_refusal_stops_a_run_before_any_work(tmp_path):
    path = _write(tmp_path / "n.csv", [(1.0, "nan" if i == 2 else 2.0, i % 2)
                                       for i in range(12)])
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=["dataset=files", f"dataset.path={path}",
                                           "num_clients=2", "partitioner=iid"])
    with pytest.raises(ConfigError, match=r"1 of 12 rows have NaN .* column 'b'"):
        validate(cfg)


def test_a_node_applies_the_runs_statistics_not_its_own(tmp_path):
    path, _ = _scaled_table(tmp_path)
    task = build_splits({**AUTO, "path": path})
    sent = task.standardisation.wire()
    assert set(sent) == {"data-mean", "data-std"}
    node_path = _write(tmp_path / "node.csv", [(2000.0, 1.0, 0), (1000.0, 0.5, 1)])
    with pytest.raises(DataConfigError, match=r"^data-path='.*node.csv': dataset.mean=auto "
                                              r"needs the run's training statistics"):
        load_dataset_from_path(node_path, AUTO)
    x = _x(load_dataset_from_path(node_path, AUTO, sent))
    expected = (np.array([[2000.0, 1.0], [1000.0, 0.5]]) - sent["data-mean"]) / sent["data-std"]
    np.testing.assert_allclose(x, expected, rtol=1e-5)
    # through the ClientApp's data loading, with the statistics from the message config
    ctx = Context(run_id=1, node_id=3, node_config={"data-path": node_path}, state=RecordDict(),
                  run_config={})
    xt, _ = client_data(settings_with(dataset=AUTO), ctx, config=sent)
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5)
    # configured statistics are used as given
    fixed = {**AUTO, "mean": [0.0, 0.0], "std": [1000.0, 1.0]}
    np.testing.assert_allclose(_x(load_dataset_from_path(node_path, fixed)),
                               [[2.0, 1.0], [1.0, 0.5]], rtol=1e-6)


def test_bad_mean_values_are_one_line_errors(tmp_path):
    path, _ = _scaled_table(tmp_path)
    with pytest.raises(DataConfigError, match=r"^dataset.mean='median' is not allowed; allowed: "
                                              r"auto, null"):
        build_splits({**AUTO, "path": path, "mean": "median"})


def test_a_table_run_sends_and_saves_its_statistics_and_learns(tmp_path):
    from sklearn.datasets import load_wine

    from fedrac.run import run_experiment

    bunch = load_wine()
    rows = [(*map(float, x), int(y)) for x, y in zip(bunch.data, bunch.target, strict=True)]
    path = _write(tmp_path / "wine.csv", rows, header=(*bunch.feature_names, "label"))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=[
            "dataset=files", f"dataset.path={path}", "strategy=fedavg", "num_rounds=10",
            "num_clients=4", "partitioner=iid", "fraction_evaluate=1.0"]))
    cfg["output_dir"], cfg["cache_dir"] = str(tmp_path / "out"), str(tmp_path / "cache")
    summary = run_experiment(cfg)
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert len(data["standardisation"]["mean"]) == 13 and data["standardisation"]["auto"]
    assert data["standardisation"]["columns"][-1] == "proline"
    assert summary["final_accuracy"] >= 0.9  # unstandardised: 0.40 (see docs/tables-and-plots.md)
    with open(tmp_path / "out" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["bytes_down_config"]) > 4 * 2 * 13 * 8  # the statistics went out
