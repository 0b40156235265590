"""Data without copies: Arrow tables on the arrays' own buffers, the same values as before,
no caller's array changed, flwr-datasets' plotting imports deferred."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from datasets import Dataset

from fedrac.data import to_dataset, to_tensors
from fedrac.data.columns import column_values
from fedrac.data.load import _normalise, _select
from fedrac.data.sources import Arrays, read_synthetic


def test_to_dataset_shares_the_buffer_and_matches_from_dict():
    x = np.random.default_rng(0).standard_normal((40, 3, 4, 5), dtype=np.float32)
    y = np.arange(40) % 7
    ds = to_dataset(x, y)
    flat = ds.data.column("x").chunk(0).flatten().flatten().flatten()
    assert np.shares_memory(flat.to_numpy(zero_copy_only=True), x)  # no copy of x
    ref = Dataset.from_dict({"x": x, "label": y})
    for a, b in zip(to_tensors(ds), to_tensors(ref), strict=True):
        assert torch.equal(a, b)
    rows = ds.shuffle(seed=1).select(range(5, 12))
    assert np.array_equal(np.asarray(rows.with_format("numpy")["x"]), x[rows._indices.column(0)
                                                                          .to_numpy()])
    # the fingerprint is a hash of the content: same data, same fingerprint; else another
    assert to_dataset(x.copy(), y)._fingerprint == ds._fingerprint
    x2 = x.copy()
    x2[3, 1, 2, 0] += 1
    assert to_dataset(x2, y)._fingerprint != ds._fingerprint


def test_normalise_gives_the_old_values_and_never_changes_its_input():
    raw = np.random.default_rng(1).integers(0, 256, (6, 3, 2, 2)).astype(np.uint8)
    cfg = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}
    old = raw.astype(np.float32) * np.float32(1 / 255)
    v = np.asarray(cfg["mean"], np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(cfg["std"], np.float32).reshape(1, 3, 1, 1)
    assert np.array_equal(_normalise(raw, cfg), (old - v) / s)
    floats = np.random.default_rng(2).standard_normal((6, 3), dtype=np.float32)
    keep = floats.copy()
    out = _normalise(floats, {"mean": [1.0], "std": [2.0]})
    assert np.array_equal(floats, keep) and np.array_equal(out, (keep - 1) / 2)
    assert _normalise(floats, {}) is floats  # nothing to do: no copy


def test_select_takes_views_of_one_block_and_copies_otherwise():
    a = Arrays(np.arange(20.0).reshape(10, 2), np.array([0, 0, 1, 1, 1, 2, 2, 1, 3, 3]))
    block = _select(a, np.isin(a.y, [1, 2]) & (np.arange(10) < 7), {1: 0, 2: 1})
    assert np.shares_memory(block.x, a.x) and block.y.tolist() == [0, 0, 0, 1, 1]
    spread = _select(a, np.isin(a.y, [1, 3]), {1: 0, 3: 1})
    assert not np.shares_memory(spread.x, a.x)
    assert spread.x[:, 0].tolist() == [4, 6, 8, 14, 16, 18]
    assert spread.y.tolist() == [0, 0, 0, 0, 1, 1]


def test_synthetic_data_are_the_same_draws_as_before():
    """The generator writes into preallocated arrays now; the values must not change."""
    cfg = {"shape": [2, 3], "num_classes": 3, "source_samples": 7, "target_samples": 9000,
           "test_samples": 5, "seed": 4}
    rng = np.random.default_rng(4)  # the former implementation, verbatim
    means = rng.standard_normal((6, 6), dtype=np.float32) * 2.0

    def draw(first, count):
        y = rng.integers(first, first + 3, count)
        x = rng.standard_normal((count, 6), dtype=np.float32)
        x += means[y]
        return x.reshape(count, 2, 3), y

    (xs, ys), (xt, yt) = draw(0, 7), draw(3, 9000)
    (xs2, ys2), (xt2, yt2) = draw(0, 5), draw(3, 5)
    got = read_synthetic(cfg)
    assert np.array_equal(got.x, np.concatenate([xs, xt]))
    assert np.array_equal(got.y, np.concatenate([ys, yt]))
    assert np.array_equal(got.test.x, np.concatenate([xs2, xt2]))
    assert np.array_equal(got.test.y, np.concatenate([ys2, yt2]))


def test_column_values_follow_the_row_order():
    ds = to_dataset(np.zeros((50, 2), np.float32), np.arange(50))
    for view in (ds, ds.shuffle(seed=3), ds.shuffle(seed=3).select([4, 1, 1, 9]),
                 ds.shuffle(seed=5).sort("label")):
        assert column_values(view, "label").tolist() == list(view["label"])


def test_flwr_datasets_plots_are_imported_only_when_used():
    code = ("import sys, fedrac.data.partitioners; print('seaborn' in sys.modules); "
            "from flwr_datasets.visualization import plot_label_distributions as p; "
            "print(callable(p), 'seaborn' in sys.modules); "
            "import flwr_datasets.visualization.heatmap_plot as h; "
            "print(callable(h._plot_heatmap))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True", "True", "True"]
