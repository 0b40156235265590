"""Each dataset source from files the test writes; normalisation; bad-input messages."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fedrac.data import build_splits, load_dataset_from_path, load_splits, to_tensors
from fedrac.data.sources import DataConfigError

FILES = {"name": "files", "test_fraction": 0.25, "split_seed": 0}


def _x(ds) -> np.ndarray:
    return to_tensors(ds)[0].numpy()


def _y(ds) -> np.ndarray:
    return to_tensors(ds)[1].numpy()


def test_digits_default_task_keeps_images_and_relabels_classes():
    task = load_splits({"name": "digits", "source_classes": [0, 1, 2, 3, 4],
                      "target_classes": [5, 6, 7, 8, 9], "test_fraction": 0.25, "split_seed": 0})
    assert task.input_shape == (1, 8, 8) and task.num_classes == 5
    sizes = [len(task.source_train), len(task.source_test), len(task.target_train),
             len(task.target_test)]
    assert sum(sizes) == 1797 and sizes == [675, 226, 672, 224]
    x, y = to_tensors(task.target_train)
    assert x.shape == (672, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1, 2, 3, 4} and 0 <= x.min() and x.max() <= 1


def test_to_tensors_matches_the_numpy_formatter_on_a_shuffled_selection():
    task = load_splits({"name": "digits", "source_classes": None, "target_classes": None})
    ds = task.target_train.shuffle(seed=3).select(range(5, 400, 7))
    x, y = to_tensors(ds)
    np_ds = ds.with_format("numpy")
    assert np.array_equal(x.numpy(), np.asarray(np_ds["x"], dtype=np.float32))
    assert np.array_equal(y.numpy(), np.asarray(np_ds["label"]))


def test_a_task_without_source_classes_has_no_pretraining_data(tmp_path):
    from fedrac.models import build_model
    from fedrac.models.pretrain import pretrained_state

    cfg = {"name": "digits", "source_classes": None, "target_classes": None}
    task = load_splits(cfg)
    assert len(task.source_train) == 0 and task.num_classes == 10
    assert len(task.target_train) + len(task.target_test) == 1797
    state = pretrained_state({"name": "mlp", "hidden": [8]}, cfg,
                             {"epochs": 3, "seed": 5}, tmp_path)
    torch.manual_seed(5)
    fresh = build_model({"name": "mlp", "hidden": [8]}, task.input_shape, 10).state_dict()
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)  # initial weights kept


def _write_images(root: Path, classes: dict[str, int], size=(5, 6), mode="L") -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = size if mode == "L" else (*size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"{i}.png")


def test_image_folder_gives_chw_images_scaled_to_unit_range(tmp_path):
    _write_images(tmp_path / "imgs", {"cat": 6, "dog": 6})
    task = build_splits({**FILES, "path": str(tmp_path / "imgs")})
    assert task.input_shape == (1, 5, 6) and task.num_classes == 2
    assert len(task.target_train) == 9 and len(task.target_test) == 3
    # the same image, read back by hand, is the row scaled by 1/255
    first = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png"), dtype=np.float32) / 255
    node = load_dataset_from_path(str(tmp_path / "imgs"), {**FILES})
    assert len(node) == 12 and set(_y(node).tolist()) == {0, 1}
    assert any(np.allclose(row[0], first) for row in _x(node))


def test_image_folder_rgb_resized_and_normalised_per_channel(tmp_path):
    _write_images(tmp_path / "imgs", {"a": 3, "b": 3, "c": 3}, size=(7, 7), mode="RGB")
    cfg = {**FILES, "path": str(tmp_path / "imgs"), "image_size": [4, 4],
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    task = build_splits(cfg)
    assert task.input_shape == (3, 4, 4) and task.num_classes == 3
    x = _x(load_dataset_from_path(cfg["path"], cfg))
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6 and x.min() < -1


def test_image_folder_with_one_class_is_refused(tmp_path):
    _write_images(tmp_path / "imgs", {"only": 4})
    with pytest.raises(DataConfigError, match=r"image folder with 1 class sub-folder"):
        build_splits({**FILES, "path": str(tmp_path / "imgs")})


def _table(n: int = 40) -> dict[str, list]:
    rng = np.random.default_rng(1)
    return {"f0": rng.normal(size=n).tolist(), "f1": rng.normal(size=n).tolist(),
            "label": [i % 4 for i in range(n)], "writer": [f"w{i % 5}" for i in range(n)]}


def test_csv_infers_numeric_features_without_label_and_group(tmp_path):
    import csv

    data = _table()
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(data)
        w.writerows(zip(*data.values(), strict=True))
    cfg = {**FILES, "path": str(path), "group_column": "writer"}
    task = build_splits(cfg)
    assert task.input_shape == (2,) and task.num_classes == 4
    assert set(task.target_train.column_names) == {"x", "label", "writer"}
    node = load_dataset_from_path(str(path), cfg)
    assert np.allclose(_x(node), np.stack([data["f0"], data["f1"]], axis=1), atol=1e-6)
    assert _y(node).tolist() == data["label"]


def test_parquet_with_feature_columns_and_class_split(tmp_path):
    data = _table()
    pq.write_table(pa.table(data), tmp_path / "t.parquet")
    cfg = {**FILES, "path": str(tmp_path / "t.parquet"), "feature_columns": ["f1"],
           "source_classes": [0, 1], "target_classes": [2, 3]}
    task = build_splits(cfg)
    assert task.input_shape == (1,) and task.num_classes == 2
    assert len(task.source_train) + len(task.source_test) == 20
    assert set(_y(task.target_train).tolist()) == {0, 1}
    node = load_dataset_from_path(cfg["path"], cfg)  # target classes only, relabelled
    assert len(node) == 20 and set(_y(node).tolist()) == {0, 1}


def test_csv_without_the_label_column_names_the_columns(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(DataConfigError, match=r"dataset.label_column='label' is not a column .*"
                                              r"allowed: a, b"):
        build_splits({**FILES, "path": str(tmp_path / "t.csv")})


def test_labels_that_are_not_integers_are_refused(tmp_path):
    (tmp_path / "t.csv").write_text("a,label\n1,cat\n3,dog\n2,cat\n4,dog\n")
    splits = build_splits({**FILES, "path": str(tmp_path / "t.csv"), "test_fraction": 0.5})
    assert splits.label_names == ["cat", "dog"]  # string labels are mapped to ids, not refused
    (tmp_path / "u.csv").write_text("a,label\n5,emu\n")
    with pytest.raises(DataConfigError, match=r"labels \['emu'\] are not in dataset.label_names"):
        build_splits({**FILES, "path": str(tmp_path / "t.csv"), "label_names": ["cat", "dog"],
                    "test_path": str(tmp_path / "u.csv")})
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 2)), y=np.array([0.5, 1, 0, 1]))
    with pytest.raises(DataConfigError, match=r"labels must be integers .*got 0.5"):
        build_splits({**FILES, "path": str(tmp_path / "f.npz")})


def test_npz_arrays_with_their_own_test_split(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (30, 2, 3, 3), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:6], y_test=y[:6])
    cfg = {**FILES, "path": str(tmp_path / "d.npz")}
    task = build_splits(cfg)
    assert task.input_shape == (2, 3, 3) and task.num_classes == 3
    assert len(task.target_train) == 30 and len(task.target_test) == 6
    assert np.allclose(_x(task.target_train), x / 255, atol=1e-6)
    node = load_dataset_from_path(cfg["path"], cfg)
    assert np.allclose(_x(node)[:30], x / 255, atol=1e-6) and len(node) == 36


def test_npz_without_y_and_a_missing_path_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)))
    with pytest.raises(DataConfigError, match=r"lacks array 'y' .*it has: x"):
        build_splits({**FILES, "path": str(tmp_path / "d.npz")})
    for path in (tmp_path / "nope.csv", tmp_path / "nofolder"):
        with pytest.raises(DataConfigError, match=r"dataset.path=.* does not exist") as err:
            build_splits({**FILES, "path": str(path)})
        assert "\n" not in str(err.value)
    with pytest.raises(DataConfigError, match=r"data-path=.* does not exist"):
        load_dataset_from_path(str(tmp_path / "nope.npz"), FILES)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataConfigError, match=r"is not a readable .npz file"):
        load_dataset_from_path(str(tmp_path / "junk.npz"), FILES)


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_tiny_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, n in (("train", 40), ("t10k", 20)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    task = build_splits({"name": "mnist", "root": str(tmp_path), "source_classes": [0, 1, 2, 3, 4],
                       "target_classes": [5, 6, 7, 8, 9]})
    assert task.input_shape == (1, 28, 28) and task.num_classes == 5
    assert (len(task.source_train), len(task.target_train), len(task.target_test)) == (20, 20, 10)
    assert set(_y(task.target_train).tolist()) == {0, 1, 2, 3, 4}
    assert 0 <= _x(task.target_train).min() and _x(task.target_train).max() <= 1


def test_mnist_and_cifar_files_read_as_torchvision_reads_them(tmp_path):
    import gzip
    import pickle

    from fedrac.data.sources import read_torchvision

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(4)
    images = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 12), ("t10k", 6))}
    for split, x in images.items():
        _idx(raw / f"{split}-images-idx3-ubyte", x)
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(len(x)) % 10)
    # a gzipped file stands in for its plain twin
    gz = raw / "t10k-labels-idx1-ubyte"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(gz.read_bytes()))
    gz.unlink()
    got = read_torchvision({"name": "mnist", "root": str(tmp_path)})
    assert np.array_equal(got.x[:, 0], images["train"]) and got.x.shape == (12, 1, 28, 28)
    assert np.array_equal(got.test.y, np.arange(6) % 10)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batches[name] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        with (cifar / name).open("wb") as f:
            pickle.dump({"data": batches[name], "labels": [1, 2, 3]}, f)
    (cifar / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    got = read_torchvision({"name": "cifar10", "root": str(tmp_path)})
    assert got.x.shape == (15, 3, 32, 32) and got.test.x.shape == (3, 3, 32, 32)
    assert np.array_equal(got.x[0].reshape(-1), batches["data_batch_1"][0])
    try:
        import torchvision
    except ImportError:
        return
    # (torchvision's CIFAR10 checks the real files' MD5 sums, so only MNIST is compared)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(
        (raw / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    tvm = torchvision.datasets.MNIST(str(tmp_path), train=False)
    assert np.array_equal(tvm.data.numpy(), images["t10k"])


def test_missing_torchvision_files_are_named(tmp_path):
    with pytest.raises(DataConfigError, match=r"lacks the mnist files train-images-idx3-ubyte, "
                                              r"train-labels-idx1-ubyte, t10k-images.*download"):
        build_splits({"name": "mnist", "root": str(tmp_path)})
    with pytest.raises(DataConfigError, match=r"cifar10 files data_batch_1"):
        build_splits({"name": "cifar10", "root": str(tmp_path)})


def test_unknown_dataset_and_unknown_format(tmp_path):
    with pytest.raises(DataConfigError, match=r"dataset.name='nope' is not a dataset; allowed:"):
        build_splits({"name": "nope"})
    (tmp_path / "d.txt").write_text("1")
    with pytest.raises(DataConfigError, match=r"unknown format '.txt'"):
        build_splits({**FILES, "path": str(tmp_path / "d.txt")})


def hf_maker(n: int = 30) -> dict:
    """A ``_target_`` dataset: train/test ``datasets.Dataset`` objects with image-shaped x."""
    from datasets import Dataset

    def make(k: int, offset: int) -> Dataset:
        x = np.arange(k * 4, dtype=np.float32).reshape(k, 1, 2, 2) + offset
        return Dataset.from_dict({"x": x, "label": np.arange(k) % 3})

    return {"train": make(n, 0), "test": make(6, 1000)}


def test_target_callable_returning_hf_datasets_with_a_test_split():
    task = build_splits({"name": "custom", "_target_": f"{__name__}.hf_maker",
                       "kwargs": {"n": 12}})
    assert task.input_shape == (1, 2, 2) and task.num_classes == 3
    assert len(task.target_train) == 12 and len(task.target_test) == 6
    assert _x(task.target_test).min() == 1000
    with pytest.raises(DataConfigError, match=r"dataset._target_='nowhere.fn' failed"):
        build_splits({"name": "custom", "_target_": "nowhere.fn"})


def test_domain_split_by_group_column(tmp_path):
    rows = "\n".join(f"{i},{i % 2},{'lab' if i < 30 else 'field'}" for i in range(50))
    (tmp_path / "d.csv").write_text("a,label,site\n" + rows)
    task = build_splits({**FILES, "path": str(tmp_path / "d.csv"), "group_column": "site",
                       "source_groups": ["lab"]})
    assert set(task.source_train["site"]) == {"lab"} and set(task.target_test["site"]) == {"field"}
    assert len(task.source_train) + len(task.source_test) == 30 and task.num_classes == 2



def test_hub_and_files_without_a_path_say_what_to_set():
    with pytest.raises(DataConfigError, match=r"dataset.path=None is not set; allowed: a Hugging "
                                              r"Face hub id"):
        build_splits({"name": "hub", "path": None})
    with pytest.raises(DataConfigError, match=r"dataset.path=None is not set; allowed: a folder"):
        build_splits({"name": "files", "path": None})


def test_a_node_folder_holding_one_npz_file_with_a_label_array(tmp_path):
    (tmp_path / "node").mkdir()
    np.savez(tmp_path / "node" / "data.npz", x=np.ones((5, 3)), label=np.array([0, 1, 0, 1, 1]))
    node = load_dataset_from_path(str(tmp_path / "node"), FILES)
    assert _y(node).tolist() == [0, 1, 0, 1, 1] and _x(node).shape == (5, 3)


def test_json_lines_table(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(
        f'{{"u": {i}, "v": {i * 0.5}, "y": {i % 2}}}' for i in range(10)))
    task = build_splits({**FILES, "path": str(tmp_path / "t.jsonl"), "label_column": "y"})
    assert task.input_shape == (2,) and task.num_classes == 2
    assert len(task.target_train) + len(task.target_test) == 10


def test_pretraining_cache_follows_changes_to_the_data_file(tmp_path):
    from fedrac.models.pretrain import pretrained_state

    path = tmp_path / "d.npz"
    cfg = {**FILES, "path": str(path), "source_classes": [0, 1], "target_classes": [2, 3]}
    pre = {"epochs": 2, "seed": 0, "lr": 0.1}
    model = {"name": "mlp", "hidden": [4]}
    np.savez(path, x=np.eye(8)[np.arange(40) % 8], y=np.arange(40) % 4)
    first = pretrained_state(model, cfg, pre, tmp_path / "cache")
    np.savez(path, x=-np.eye(8)[np.arange(40) % 8] * 3, y=np.arange(40) % 4)
    from fedrac.data import load as data

    data._load_splits_cached.cache_clear()
    second = pretrained_state(model, cfg, pre, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert not torch.equal(first["fc1.weight"], second["fc1.weight"])


def test_synthetic_stand_in_takes_an_image_shape_and_refuses_a_bad_one():
    cfg = {"name": "synthetic", "shape": [3, 4, 4], "num_classes": 3, "source_samples": 0,
           "target_samples": 30, "test_samples": 30, "seed": 0, "source_classes": None,
           "target_classes": [3, 4, 5]}
    task = build_splits(cfg)
    x, y = to_tensors(task.target_train)
    assert task.input_shape == (3, 4, 4) and task.num_classes == 3
    assert x.shape == (30, 3, 4, 4) and set(y.tolist()) <= {0, 1, 2}
    with pytest.raises(DataConfigError, match=r"dataset.shape=\[3, 0\].*positive integers"):
        build_splits({**cfg, "shape": [3, 0]})
