"""Datasets as ``datasets.Dataset`` objects, source/target splits, client partitions.

The embedded default is scikit-learn's bundled handwritten digits (8x8, 1,797
images): the *source* task (digits 0-4) pretrains the model, the *target* task
(digits 5-9, relabelled 0-4) is fine-tuned federatedly. Client partitions come
from ``flwr-datasets`` partitioners.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

DATASETS = ("digits", "synthetic")
PARTITIONERS = ("iid", "dirichlet")


class DataConfigError(ValueError):
    """Raised for data settings that cannot work (message names the key)."""


@dataclass
class Task:
    """An adaptation task: source data to pretrain on, target data to fine-tune on."""

    source_train: Dataset
    source_test: Dataset
    target_train: Dataset
    target_test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def _to_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    return Dataset.from_dict({"x": x.astype(np.float32), "label": y.astype(np.int64)})


def _relabel_subset(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> Dataset:
    classes = [int(c) for c in classes]
    keep = np.isin(y, classes)
    mapping = {c: i for i, c in enumerate(classes)}
    return _to_dataset(x[keep], np.array([mapping[int(v)] for v in y[keep]], dtype=np.int64))


def _digits_task(cfg: Mapping[str, Any]) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=float(cfg.get("test_fraction", 0.25)), stratify=y,
        random_state=int(cfg.get("split_seed", 0)),
    )
    src = cfg.get("source_classes", [0, 1, 2, 3, 4])
    tgt = cfg.get("target_classes", [5, 6, 7, 8, 9])
    if len(src) != len(tgt):
        raise DataConfigError(
            f"dataset.source_classes={list(src)} and dataset.target_classes={list(tgt)} must have "
            "the same length (the pretrained head is reused)"
        )
    return Task(
        source_train=_relabel_subset(x_tr, y_tr, src),
        source_test=_relabel_subset(x_te, y_te, src),
        target_train=_relabel_subset(x_tr, y_tr, tgt),
        target_test=_relabel_subset(x_te, y_te, tgt),
        input_shape=(64,),
        num_classes=len(tgt),
    )


def _synthetic_task(cfg: Mapping[str, Any]) -> Task:
    """Gaussian class clusters: a stand-in where only speed matters (DESIGN section 10)."""
    dim, k = int(cfg.get("features", 64)), int(cfg.get("num_classes", 5))
    rng = np.random.default_rng(int(cfg.get("seed", 0)))
    src_means, tgt_means = rng.standard_normal((2, k, dim)) * 2.0

    def split(means: np.ndarray, count: int) -> Dataset:
        y = rng.integers(0, k, count)
        return _to_dataset(means[y] + rng.standard_normal((count, dim)), y)

    n_src, n_tgt = int(cfg.get("source_samples", 2000)), int(cfg.get("target_samples", 50000))
    n_test = int(cfg.get("test_samples", 1000))
    return Task(split(src_means, n_src), split(src_means, n_test), split(tgt_means, n_tgt),
                split(tgt_means, n_test), (dim,), k)


def _key(cfg: Mapping[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _load_task_cached(key: str) -> Task:
    cfg = json.loads(key)
    name = cfg.get("name")
    if name == "digits":
        return _digits_task(cfg)
    if name == "synthetic":
        return _synthetic_task(cfg)
    raise DataConfigError(f"dataset.name={name!r} is not a dataset; allowed: {', '.join(DATASETS)}")


def load_task(dataset_cfg: Mapping[str, Any]) -> Task:
    """The source/target task described by the ``dataset`` config group (cached per process)."""
    return _load_task_cached(_key(dict(dataset_cfg)))


def build_partitioner(part_cfg: Mapping[str, Any], num_partitions: int, seed: int) -> Partitioner:
    """A ``flwr-datasets`` partitioner from the ``partitioner`` config group."""
    name = part_cfg.get("name")
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label",
            alpha=float(part_cfg.get("alpha", 0.5)),
            min_partition_size=int(part_cfg.get("min_partition_size", 5)),
            self_balancing=bool(part_cfg.get("self_balancing", False)), seed=int(seed),
        )
    raise DataConfigError(
        f"partitioner.name={name!r} is not a partitioner; allowed: {', '.join(PARTITIONERS)}"
    )


@functools.lru_cache(maxsize=2)
def _partitioner_cached(key: str) -> Partitioner:
    d = json.loads(key)
    task = load_task(d["dataset"])
    partitioner = build_partitioner(d["partitioner"], d["num_partitions"], d["seed"])
    partitioner.dataset = task.target_train.shuffle(seed=int(d["seed"]))
    return partitioner


def partition(
    dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
    num_partitions: int, partition_id: int, seed: int,
) -> Dataset:
    """Client ``partition_id``'s share of the target training data."""
    if not 0 <= int(partition_id) < int(num_partitions):
        raise DataConfigError(
            f"partition-id={partition_id} is out of range; allowed: 0..{int(num_partitions) - 1}"
        )
    key = _key({"dataset": dict(dataset_cfg), "partitioner": dict(part_cfg),
                "num_partitions": int(num_partitions), "seed": int(seed)})
    return _partitioner_cached(key).load_partition(int(partition_id))


def _arrow_column(ds: Dataset, name: str) -> np.ndarray | None:
    """Column ``name`` as one array straight from Arrow (``None`` if not fixed-size lists)."""
    import pyarrow as pa

    col = ds.with_format("arrow")[:].column(name).combine_chunks()
    n, shape = len(col), []
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or \
            pa.types.is_fixed_size_list(col.type):
        if col.null_count:
            return None
        lengths = np.diff(np.asarray(col.offsets)) if not pa.types.is_fixed_size_list(
            col.type) else np.full(len(col), col.type.list_size)
        if len(lengths) and (lengths != lengths[0]).any():
            return None
        shape.append(int(lengths[0]) if len(lengths) else 0)
        col = col.flatten()
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)) or col.null_count:
        return None
    return col.to_numpy(zero_copy_only=False).reshape(n, *shape)


def to_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors of a dataset with columns ``x`` and ``label``."""
    x, y = _arrow_column(ds, "x"), _arrow_column(ds, "label")
    if x is not None and y is not None:  # 30x faster than row-wise numpy formatting
        return (torch.from_numpy(np.array(x, dtype=np.float32)),
                torch.from_numpy(np.array(y, dtype=np.int64)))
    np_ds = ds.with_format("numpy")
    x = torch.as_tensor(np.asarray(np_ds["x"], dtype=np.float32))
    y = torch.as_tensor(np.asarray(np_ds["label"], dtype=np.int64))
    return x, y
