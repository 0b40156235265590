"""Each partitioner's reproducibility and size/label properties; the summary; bad splits."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fedrac.data import partition, to_tensors
from fedrac.data.partitioners import label_histograms, label_skew
from fedrac.data.sources import DataConfigError
from fedrac.data.summary import partition_summary
from tests.helpers import settings_with

DIGITS = {"name": "digits", "source_classes": [0, 1, 2, 3, 4], "target_classes": [5, 6, 7, 8, 9],
          "test_fraction": 0.25, "split_seed": 0}
N_TARGET = 672
OPTIONS = {
    "iid": {"name": "iid"},
    "dirichlet": {"name": "dirichlet", "alpha": 0.3, "min_partition_size": 5},
    "pathological": {"name": "pathological", "num_classes_per_partition": 2},
    "shard": {"name": "shard", "num_shards_per_partition": 2},
    "size_skew": {"name": "size_skew", "sizes": "linear"},
}


def _labels(part: dict, n: int, seed: int, dataset=DIGITS) -> list[list[int]]:
    return [to_tensors(partition(dataset, part, n, i, seed))[1].tolist() for i in range(n)]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_partitions_are_reproducible_from_the_seed(name):
    part = OPTIONS[name]
    first = _labels(part, 10, seed=1)
    assert _labels(dict(part), 10, seed=1) == first
    assert _labels(part, 10, seed=2) != first  # the seed shuffles the data (and the split)
    sizes = [len(c) for c in first]
    assert min(sizes) > 0
    if name != "shard":  # shards drop the incomplete last shard
        assert sum(sizes) == N_TARGET


def test_partitioner_size_and_label_properties():
    iid = [len(c) for c in _labels(OPTIONS["iid"], 10, 0)]
    assert max(iid) - min(iid) <= 1
    patho = _labels(OPTIONS["pathological"], 10, 0)
    assert all(len(set(c)) <= 2 for c in patho)
    shard = _labels(OPTIONS["shard"], 10, 0)
    assert all(len(set(c)) <= 4 for c in shard) and len({len(c) for c in shard}) == 1
    linear = [len(c) for c in _labels(OPTIONS["size_skew"], 10, 0)]
    assert linear == sorted(linear) and abs(linear[9] / linear[0] - 10) < 1.5
    dirich = [len(c) for c in _labels(OPTIONS["dirichlet"], 10, 0)]
    assert min(dirich) >= 5


def test_label_skew_orders_the_partitioners_and_is_exact_on_a_hand_case():
    hist = np.array([[2, 0], [0, 2]])
    assert label_skew(hist) == pytest.approx(0.5)
    assert label_skew(np.array([[3, 1], [3, 1]])) == 0.0
    skew = {name: label_skew(label_histograms(DIGITS, part, 10, 0, 5))
            for name, part in OPTIONS.items()}
    assert skew["iid"] < 0.1 and skew["size_skew"] < 0.15
    assert skew["iid"] < skew["dirichlet"] < skew["pathological"]


def test_natural_partitioner_gives_one_client_per_id(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 3)), np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "d.csv").write_text("a,b,label,site\n" + "\n".join(
        f"{x[i, 0]},{x[i, 1]},{y[i]},s{i % 4}" for i in range(60)))
    ds = {"name": "files", "path": str(tmp_path / "d.csv"), "group_column": "site",
          "test_fraction": 0.2}
    part = {"name": "natural", "partition_by": "site"}
    clients = [partition(ds, part, 4, i, 0) for i in range(4)]
    assert all(len(set(c["site"])) == 1 for c in clients)
    assert len({c["site"][0] for c in clients}) == 4 and sum(map(len, clients)) == 48
    with pytest.raises(DataConfigError, match=r"num_clients=5 does not match the 4 ids .*"
                                              r"allowed: num_clients=4"):
        partition(ds, part, 5, 0, 0)


def test_client_train_validation_split_is_disjoint_and_complete():
    part = {"name": "iid", "val_fraction": 0.2}
    whole = partition(DIGITS, {"name": "iid"}, 4, 1, 0)
    train, val = (partition(DIGITS, part, 4, 1, 0, split) for split in ("train", "val"))
    assert len(val) == round(0.2 * len(whole)) and len(train) + len(val) == len(whole)
    rows = {tuple(r) for r in to_tensors(whole)[0].flatten(1).tolist()}
    got = [tuple(r) for d in (train, val) for r in to_tensors(d)[0].flatten(1).tolist()]
    assert set(got) == rows and len(got) == len(rows)


def test_more_clients_than_samples_is_refused():
    with pytest.raises(DataConfigError, match=r"num_clients=700 is more than the 672 target "
                                              r"training samples; allowed: 1..672"):
        partition(DIGITS, {"name": "iid"}, 700, 0, 0)


def test_impossible_dirichlet_split_says_which_alpha_would():
    part = {"name": "dirichlet", "alpha": 0.01, "min_partition_size": 40}
    with pytest.raises(DataConfigError, match=r"partitioner.alpha=0.01 cannot give each of the "
                                              r"10 clients min_partition_size=40 .*alpha=\d") as e:
        partition(DIGITS, part, 10, 0, 0)
    works = float(str(e.value).split("; alpha=")[1].split(" ")[0])
    assert len(partition(DIGITS, {**part, "alpha": works}, 10, 0, 0)) >= 40


def test_bad_partitioner_values_name_the_key():
    with pytest.raises(DataConfigError, match=r"partitioner.sizes='cubic' is not allowed"):
        partition(DIGITS, {"name": "size_skew", "sizes": "cubic"}, 3, 0, 0)
    with pytest.raises(DataConfigError, match=r"partitioner.name='nope' is not a partitioner"):
        partition(DIGITS, {"name": "nope"}, 3, 0, 0)
    with pytest.raises(DataConfigError, match=r"partitioner.val_fraction=1.5 is not allowed"):
        partition(DIGITS, {"name": "iid", "val_fraction": 1.5}, 3, 0, 0)
    with pytest.raises(DataConfigError, match=r"partitioner=size_skew cannot split 672 samples "
                                              r"into 10 clients"):
        partition(DIGITS, {"name": "size_skew", "sizes": "exponential"}, 10, 0, 0)


def test_partition_summary_files(tmp_path, capsys):
    settings = settings_with(dataset=DIGITS, partitioner=OPTIONS["pathological"],
                             num_clients=6, seed=0)
    summary = partition_summary(settings, tmp_path)
    assert "partition: pathological on digits, input shape (1, 8, 8), 5 classes" in \
        capsys.readouterr().out
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert saved == summary and saved["samples"] == N_TARGET
    assert [c["samples"] for c in saved["clients"]] == [sum(c["labels"]) for c in saved["clients"]]
    rows = list(csv.reader(open(tmp_path / "partition.csv")))
    assert rows[0] == ["client", "samples", "label_0", "label_1", "label_2", "label_3", "label_4"]
    assert len(rows) == 7
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_histograms_without_loading_partitions_equal_the_loaded_ones(name):
    """label_histograms reads the partitioners' index tables; the counts must be those of
    the partitions the clients really load."""
    n = 5  # 672 = 5 * 134 + 2: IID shards of unequal sizes
    loaded = np.array([np.bincount(labels, minlength=5) for labels in
                       (np.asarray(c, dtype=np.int64) for c in _labels(OPTIONS[name], n, 4))])
    assert np.array_equal(label_histograms(DIGITS, OPTIONS[name], n, 4, 5), loaded)


def test_summary_lists_every_client_up_to_50_and_summarises_beyond(capsys):
    synthetic = {"name": "synthetic", "features": 4, "num_classes": 3, "source_samples": 0,
                 "target_samples": 600, "test_samples": 10, "target_classes": [3, 4, 5]}
    for n, listed in ((50, 50), (51, 0)):
        partition_summary(settings_with(dataset=synthetic, partitioner={"name": "iid"},
                                        num_clients=n, seed=0))
        out = capsys.readouterr().out.splitlines()
        rows = [line for line in out if line.split()[:1] and line.split()[0].isdigit()]
        assert len(rows) == listed
        if n == 51:
            assert out[1] == "  classes: 0=3, 1=4, 2=5"
            assert out[2].startswith("  samples per client: min 11, median 12, max 12;")
