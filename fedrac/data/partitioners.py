"""Client partitions of the target training data, from ``flwr-datasets`` partitioners.

Options (``conf/partitioner/<name>.yaml``): ``iid``, ``dirichlet`` (label skew),
``pathological`` (classes per client), ``shard`` (sorted-label shards),
``size_skew`` (linear / square / exponential sizes) and ``natural`` (one client per
value of an id column). Each client's share can be split into train/validation
(``val_fraction``). Everything is a pure function of the config and the run seed.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    SquarePartitioner,
)

from fedrac.data.columns import column_values
from fedrac.data.load import load_splits, plain
from fedrac.data.sources import DataConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological", "shard", "size_skew", "natural")
SIZE_SKEWS = {"linear": LinearPartitioner, "square": SquarePartitioner,
              "exponential": ExponentialPartitioner}
ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")


def _int(cfg: Mapping[str, Any], key: str, default: Any, low: int = 1) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise DataConfigError(f"partitioner.{key}={v!r} is not allowed; allowed: an integer "
                              f">= {low}")
    return v


def build_partitioner(part_cfg: Mapping[str, Any], num_partitions: int, seed: int) -> Partitioner:
    """A ``flwr-datasets`` partitioner from the ``partitioner`` config group."""
    name = part_cfg.get("name")
    n, seed = int(num_partitions), int(seed)
    if name == "iid":
        return IidPartitioner(num_partitions=n)
    if name == "dirichlet":
        alpha = part_cfg.get("alpha", 0.5)
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
            raise DataConfigError(f"partitioner.alpha={alpha!r} is not allowed; allowed: a "
                                  "number > 0")
        return DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=float(alpha),
            min_partition_size=_int(part_cfg, "min_partition_size", 5, low=0),
            self_balancing=bool(part_cfg.get("self_balancing", False)), seed=seed)
    if name == "pathological":
        mode = part_cfg.get("class_assignment_mode", "random")
        if mode not in ASSIGNMENT_MODES:
            raise DataConfigError(f"partitioner.class_assignment_mode={mode!r} is not allowed; "
                                  f"allowed: {', '.join(ASSIGNMENT_MODES)}")
        return PathologicalPartitioner(
            num_partitions=n, partition_by="label",
            num_classes_per_partition=_int(part_cfg, "num_classes_per_partition", 2),
            class_assignment_mode=mode, seed=seed)
    if name == "shard":
        size = part_cfg.get("shard_size")
        return ShardPartitioner(
            num_partitions=n, partition_by="label",
            num_shards_per_partition=_int(part_cfg, "num_shards_per_partition", 2),
            shard_size=None if size is None else _int(part_cfg, "shard_size", None),
            keep_incomplete_shard=bool(part_cfg.get("keep_incomplete_shard", False)), seed=seed)
    if name == "size_skew":
        sizes = part_cfg.get("sizes", "linear")
        if sizes not in SIZE_SKEWS:
            raise DataConfigError(f"partitioner.sizes={sizes!r} is not allowed; allowed: "
                                  f"{', '.join(SIZE_SKEWS)}")
        return SIZE_SKEWS[sizes](num_partitions=n)
    if name == "natural":
        column = part_cfg.get("partition_by")
        if not column:
            raise DataConfigError(f"partitioner.partition_by={column!r} is not set; allowed: an "
                                  "id column of the data (set dataset.group_column to keep one)")
        return NaturalIdPartitioner(partition_by=str(column))
    raise DataConfigError(
        f"partitioner.name={name!r} is not a partitioner; allowed: {', '.join(PARTITIONERS)}")


def _ready(part_cfg: Mapping[str, Any], ds: Dataset, n: int, seed: int) -> Partitioner:
    """A partitioner over ``ds`` whose partitions are computed and checked."""
    name = part_cfg.get("name")
    partitioner = build_partitioner(part_cfg, n, seed)
    if n > len(ds):
        raise DataConfigError(f"num_clients={n} is more than the {len(ds)} target training "
                              f"samples; allowed: 1..{len(ds)}")
    if name == "natural":
        column = part_cfg.get("partition_by")
        if column not in ds.column_names:
            raise DataConfigError(f"partitioner.partition_by={column!r} is not a column of the "
                                  "target data; set dataset.group_column to that id column")
        ids = len(set(ds[column]))
        if ids != n:
            raise DataConfigError(f"num_clients={n} does not match the {ids} ids of partitioner."
                                  f"partition_by={column!r}; allowed: num_clients={ids}")
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():  # Dirichlet retries warn; the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            partitioner.load_partition(0)  # splits the data (once): raises when it cannot
            sizes = [_size(partitioner, i) for i in range(n)]
    except ValueError as err:
        raise DataConfigError(_explain(part_cfg, ds, n, seed, err)) from err
    empty = [i for i, s in enumerate(sizes) if s == 0]
    if empty:
        raise DataConfigError(f"partitioner={name} gives client(s) {empty[:5]} no samples with "
                              f"num_clients={n} and {len(ds)} samples; use fewer clients or "
                              "another partitioner setting")
    return partitioner


def _explain(part_cfg: Mapping[str, Any], ds: Dataset, n: int, seed: int, err: Exception) -> str:
    name, first = part_cfg.get("name"), str(err).splitlines()[0]
    if name != "dirichlet":
        return f"partitioner={name} cannot split {len(ds)} samples into {n} clients: {first}"
    alpha, min_size = float(part_cfg.get("alpha", 0.5)), part_cfg.get("min_partition_size", 5)
    works = None
    for k in range(1, 11):
        trial = {**part_cfg, "alpha": alpha * 2 ** k}
        p = build_partitioner(trial, n, seed)
        p.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                p.load_partition(0)
        except ValueError:
            continue
        works = trial["alpha"]
        break
    hint = f"alpha={works:g} would (with seed {seed})" if works else \
        "no alpha up to 1024x would; lower partitioner.min_partition_size or num_clients"
    return (f"partitioner.alpha={alpha:g} cannot give each of the {n} clients "
            f"min_partition_size={min_size} samples (of {len(ds)}); {hint}")


@functools.lru_cache(maxsize=2)
def _partitioner_cached(key: str) -> Partitioner:
    d = json.loads(key)
    task = load_splits(d["dataset"])
    ds = task.target_train.shuffle(seed=int(d["seed"]))
    return _ready(d["partitioner"], ds, int(d["num_partitions"]), int(d["seed"]))


def _partitioner_key(dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
                     num_partitions: int, seed: int) -> str:
    return json.dumps({"dataset": plain(dataset_cfg), "partitioner": plain(part_cfg),
                       "num_partitions": int(num_partitions), "seed": int(seed)},
                      sort_keys=True, default=str)


def partitioner_for(dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
                    num_partitions: int, seed: int) -> Partitioner:
    """The checked partitioner of the target training data (cached per process)."""
    return _partitioner_cached(_partitioner_key(dataset_cfg, part_cfg, num_partitions, seed))


def _val_fraction(part_cfg: Mapping[str, Any]) -> float:
    v = part_cfg.get("val_fraction", 0.0)
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
        raise DataConfigError(f"partitioner.val_fraction={v!r} is not allowed; allowed: a "
                              "number in [0, 1)")
    return float(v)


def client_split(dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
                 num_partitions: int, partition_id: int, seed: int, split: str) -> Dataset:
    """Client ``partition_id``'s ``train`` or ``val`` share (see :func:`fedrac.data.partition`)."""
    if not 0 <= partition_id < num_partitions:
        raise DataConfigError(
            f"partition-id={partition_id} is out of range; allowed: 0..{num_partitions - 1}")
    if split not in ("train", "val"):
        raise DataConfigError(f"split={split!r} is not allowed; allowed: train, val")
    ds = partitioner_for(dataset_cfg, part_cfg, num_partitions, seed).load_partition(partition_id)
    frac = _val_fraction(part_cfg)
    if frac == 0 or len(ds) < 2:
        return ds
    n_val = min(len(ds) - 1, max(1, int(round(frac * len(ds)))))
    order = np.random.default_rng([int(seed), 7, int(partition_id)]).permutation(len(ds))
    idx = order[:n_val] if split == "val" else order[n_val:]
    return ds.select(np.sort(idx))


def check_partitions(dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
                     num_partitions: int, seed: int) -> None:
    """Build every partition once; a one-line DataConfigError when the split cannot work."""
    _val_fraction(part_cfg)
    partitioner_for(dataset_cfg, part_cfg, num_partitions, seed)


def partition_indices(partitioner: Partitioner, partition_id: int) -> np.ndarray | None:
    """Rows of ``partitioner.dataset`` in partition ``partition_id`` without building it, when
    the partitioner says them (``None`` otherwise).

    IID shards are contiguous ranges (``Dataset.shard(contiguous=True)``'s arithmetic); the
    other flwr-datasets partitioners keep a partition-to-indices table once they have split
    the data on their first ``load_partition``.
    """
    if type(partitioner) is IidPartitioner:
        div, mod = divmod(partitioner.dataset.num_rows, partitioner.num_partitions)
        start = div * partition_id + min(partition_id, mod)
        return np.arange(start, start + div + (1 if partition_id < mod else 0))
    table = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(table, dict) and partition_id in table:
        return np.asarray(table[partition_id], dtype=np.int64)
    return None


def _size(partitioner: Partitioner, partition_id: int) -> int:
    rows = partition_indices(partitioner, partition_id)
    return len(partitioner.load_partition(partition_id)) if rows is None else len(rows)


def partition_sizes(dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
                    num_partitions: int, seed: int) -> list[int]:
    """Each client's whole share (train and validation parts), in samples."""
    p = partitioner_for(dataset_cfg, part_cfg, num_partitions, seed)
    return [_size(p, i) for i in range(num_partitions)]


def label_histograms(dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
                     num_partitions: int, seed: int, num_classes: int) -> np.ndarray:
    """``(clients, classes)`` counts of each client's whole share."""
    p = partitioner_for(dataset_cfg, part_cfg, num_partitions, seed)
    labels = np.asarray(column_values(p.dataset, "label"), dtype=np.int64)
    hist = np.zeros((num_partitions, num_classes), dtype=np.int64)
    for i in range(num_partitions):
        rows = partition_indices(p, i)
        mine = labels[rows] if rows is not None else np.asarray(
            column_values(p.load_partition(i), "label"), dtype=np.int64)
        hist[i] = np.bincount(mine, minlength=num_classes)[:num_classes]
    return hist


def label_skew(hist: np.ndarray) -> float:
    """Mean total-variation distance of the clients' label distributions from the global one."""
    total = hist.sum(axis=0) / max(hist.sum(), 1)
    rows = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    return float(np.mean(0.5 * np.abs(rows - total).sum(axis=1)))


def partition(
    dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
    num_partitions: int, partition_id: int, seed: int, split: str = "train",
) -> Dataset:
    """Client ``partition_id``'s share of the target training data.

    With ``partitioner.val_fraction > 0`` the share is split (seeded) into ``train`` and
    ``val``; ``split="val"`` returns the validation part (the whole share when the
    fraction is 0).
    """
    return client_split(dataset_cfg, part_cfg, int(num_partitions), int(partition_id), int(seed),
                        split)
