"""Tasks as ``datasets.Dataset`` objects: normalisation, source/target splits, client partitions.

A source (see :mod:`fedrac.data.sources`) gives raw arrays; this module normalises them
(``x * scale``, then ``(x - mean) / std`` per channel or feature), splits off a test
set, and splits classes (or groups) into a *source* task, used for pretraining,
and a *target* task, fine-tuned federatedly. The embedded default is
scikit-learn's digits: pretrain on 0-4, fine-tune on 5-9 (relabelled 0-4).
Every dataset has the columns ``x`` (float32, sample shape kept) and ``label``
(int64), plus the ``group_column`` when one is set.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from fedrac.data import standardise
from fedrac.data.sources import SOURCES, Arrays, DataConfigError, read_path, read_source

DATASETS = SOURCES


log = logging.getLogger(__name__)


@dataclass
class Task:
    """An adaptation task: source data to pretrain on, target data to fine-tune on."""

    source_train: Dataset
    source_test: Dataset
    target_train: Dataset
    target_test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    standardisation: standardise.Standardisation | None = None


def to_dataset(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
               group_column: str | None = None) -> Dataset:
    """A ``datasets.Dataset`` with columns ``x`` (float32), ``label`` (int64) and the group ids."""
    data: dict[str, Any] = {"x": np.ascontiguousarray(x, dtype=np.float32),
                            "label": np.asarray(y, dtype=np.int64)}
    if group_column is not None and groups is not None:
        data[group_column] = np.asarray(groups).astype(str)
    return Dataset.from_dict(data)


def _normalise(x: np.ndarray, cfg: Mapping[str, Any]) -> np.ndarray:
    scale = cfg.get("scale")
    if scale is None:
        scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    out = x.astype(np.float32) * np.float32(scale)
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            continue
        v = np.asarray(value, dtype=np.float32).reshape(-1)
        if v.size not in (1, out.shape[1] if out.ndim > 1 else 1):
            raise DataConfigError(f"dataset.{key}={list(value)} has {v.size} values; allowed: 1 or "
                                  f"one per channel/feature ({out.shape[1]})")
        if key == "std" and np.any(v <= 0):
            raise DataConfigError(f"dataset.std={list(value)} is not allowed; allowed: values > 0")
        v = v.reshape((1, -1) + (1,) * (out.ndim - 2)) if v.size > 1 else v
        out = out - v if key == "mean" else out / v
    return out


def _class_map(classes: Sequence[int] | None) -> dict[int, int] | None:
    return None if classes is None else {int(c): i for i, c in enumerate(classes)}


def _select(a: Arrays, keep: np.ndarray, mapping: dict[int, int] | None) -> Arrays:
    y = a.y[keep]
    if mapping is not None:
        y = np.array([mapping[int(v)] for v in y], dtype=np.int64)
    return Arrays(a.x[keep], y, None if a.groups is None else a.groups[keep])


def _split_test(a: Arrays, cfg: Mapping[str, Any]) -> tuple[Arrays, Arrays]:
    if a.test is not None:
        return a, a.test
    from sklearn.model_selection import train_test_split

    frac = cfg.get("test_fraction", 0.25)
    if not isinstance(frac, int | float) or not 0 < float(frac) < 1:
        raise DataConfigError(f"dataset.test_fraction={frac!r} is not allowed; allowed: a number "
                              "in (0, 1)")
    counts = np.bincount(a.y) if len(a.y) else np.zeros(0)
    stratify = a.y if len(counts[counts > 0]) > 1 and counts[counts > 0].min() >= 2 else None
    idx = np.arange(len(a.y))
    try:
        tr, te = train_test_split(idx, test_size=float(frac), stratify=stratify,
                                  random_state=int(cfg.get("split_seed", 0)))
    except ValueError as err:
        raise DataConfigError(f"dataset.test_fraction={frac}: cannot split {len(idx)} samples "
                              f"({str(err).splitlines()[0]})") from err

    def take(i: np.ndarray) -> Arrays:
        return Arrays(a.x[i], a.y[i], None if a.groups is None else a.groups[i])

    return take(tr), take(te)


def _classes(cfg: Mapping[str, Any], key: str, labels: np.ndarray) -> list[int] | None:
    value = cfg.get(key)
    if value is None:
        return None
    present = set(np.unique(labels).tolist())
    classes = [int(c) for c in value]
    missing = [c for c in classes if c not in present]
    if missing or len(set(classes)) != len(classes):
        raise DataConfigError(f"dataset.{key}={classes} is not allowed; allowed: distinct labels "
                              f"present in the data {sorted(present)}")
    return classes


def _source_target(a: Arrays, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray,
                                                                dict | None, dict | None]:
    """Masks and label maps of the source and target tasks over ``a``."""
    src_groups, tgt_groups = cfg.get("source_groups"), cfg.get("target_groups")
    if src_groups is not None or tgt_groups is not None:
        if a.groups is None:
            raise DataConfigError(f"dataset.source_groups={src_groups} needs "
                                  "dataset.group_column; allowed: a column of the data")
        src = np.isin(a.groups, [str(g) for g in (src_groups or [])])
        tgt = np.isin(a.groups, [str(g) for g in tgt_groups]) if tgt_groups is not None else ~src
        return src, tgt, None, None
    src_c = _classes(cfg, "source_classes", a.y)
    tgt_c = _classes(cfg, "target_classes", a.y)
    if src_c is not None and tgt_c is not None and len(src_c) != len(tgt_c):
        raise DataConfigError(
            f"dataset.source_classes={src_c} and dataset.target_classes={tgt_c} must have "
            "the same length (the pretrained head is reused)")
    if tgt_c is None and src_c is not None:
        tgt_c = sorted(set(np.unique(a.y).tolist()) - set(src_c))
        if len(tgt_c) != len(src_c):
            raise DataConfigError(f"dataset.target_classes=null leaves {tgt_c} for the target "
                                  f"task; it must have as many classes as source_classes={src_c}")
    src = np.isin(a.y, src_c) if src_c is not None else np.zeros(len(a.y), bool)
    tgt = np.isin(a.y, tgt_c) if tgt_c is not None else np.ones(len(a.y), bool)
    return src, tgt, _class_map(src_c), _class_map(tgt_c)


def _num_classes(cfg: Mapping[str, Any], a: Arrays, tgt_map: dict | None) -> int:
    if tgt_map is not None:
        return len(tgt_map)
    seen = int(max(a.y.max(initial=-1), a.test.y.max(initial=-1) if a.test else -1)) + 1
    n = cfg.get("num_classes")
    if n is None:
        return seen
    if not isinstance(n, int) or n < seen:
        raise DataConfigError(f"dataset.num_classes={n!r} is not allowed; allowed: null or an "
                              f"integer >= {seen} (the largest label + 1)")
    return n


def build_task(cfg: Mapping[str, Any]) -> Task:
    """The task of a ``dataset`` config (uncached; see :func:`load_task`)."""
    raw = read_source(cfg)
    if raw.x.ndim < 2 or len(raw.x) != len(raw.y):
        raise DataConfigError(f"dataset {cfg.get('name')!r}: x has shape {raw.x.shape} and "
                              f"{len(raw.y)} labels; allowed: x of shape (N, ...) with N labels")
    if raw.test is not None and raw.test.x.shape[1:] != raw.x.shape[1:]:
        raise DataConfigError(f"dataset {cfg.get('name')!r}: test samples have shape "
                              f"{raw.test.x.shape[1:]}, training ones {raw.x.shape[1:]}")
    raw, _ = standardise.handle_non_finite(raw, cfg, _where(cfg))
    num_classes = 0
    train, test = _split_test(raw, cfg)
    stats = standardise.fit(train.x, cfg, raw.columns)  # from the training split only
    for a in (train, test):
        a.x = standardise.zero_non_finite(_normalise(a.x, stats.config(cfg)), cfg)
    group_col = cfg.get("group_column")
    parts = {}
    for split, a in (("train", train), ("test", test)):
        src, tgt, src_map, tgt_map = _source_target(a, cfg)
        for role, mask, mapping in (("source", src, src_map), ("target", tgt, tgt_map)):
            s = _select(a, mask, mapping)
            parts[f"{role}_{split}"] = to_dataset(s.x, s.y, s.groups, group_col)
        num_classes = _num_classes(cfg, raw, tgt_map)
    if len(parts["target_train"]) == 0:
        raise DataConfigError(f"dataset {cfg.get('name')!r} leaves no target training samples; "
                              "check dataset.target_classes / target_groups")
    return Task(**parts, input_shape=tuple(int(d) for d in raw.x.shape[1:]),
                num_classes=num_classes, standardisation=stats)


def _where(cfg: Mapping[str, Any]) -> str:
    if cfg.get("name") == "files":
        return f"dataset.path={str(cfg.get('path'))!r}"
    return f"dataset {cfg.get('name') or cfg.get('_target_')!r}"


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers (at any depth) turned into dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _key(cfg: Mapping[str, Any]) -> str:
    return json.dumps(plain(cfg), sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _load_task_cached(key: str) -> Task:
    task = build_task(json.loads(key))
    log.info("dataset: input shape %s, %d classes, target %d train / %d test, source %d / %d",
             task.input_shape, task.num_classes, len(task.target_train), len(task.target_test),
             len(task.source_train), len(task.source_test))
    return task


def source_stamp(dataset_cfg: Mapping[str, Any]) -> str:
    """Sizes and modification times of the local files a dataset reads (a cache-key part)."""
    stamps = []
    for key in ("path", "test_path", "root"):
        value = dataset_cfg.get(key)
        p = os.path.expanduser(str(value)) if value else ""
        if not p or not os.path.exists(p):
            continue
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p)
                                               for f in fs]
        stats = [os.stat(f) for f in files]
        stamps.append(f"{key}:{len(stats)}:{sum(st.st_size for st in stats)}:"
                      f"{max((st.st_mtime_ns for st in stats), default=0)}")
    return ";".join(stamps)


def load_task(dataset_cfg: Mapping[str, Any]) -> Task:
    """The source/target task described by the ``dataset`` config group (cached per process)."""
    return _load_task_cached(_key(dict(dataset_cfg)))


def partition(
    dataset_cfg: Mapping[str, Any], part_cfg: Mapping[str, Any],
    num_partitions: int, partition_id: int, seed: int, split: str = "train",
) -> Dataset:
    """Client ``partition_id``'s share of the target training data.

    With ``partitioner.val_fraction > 0`` the share is split (seeded) into ``train`` and
    ``val``; ``split="val"`` returns the validation part (the whole share when the
    fraction is 0).
    """
    from fedrac.data.partitioners import client_split

    return client_split(dataset_cfg, part_cfg, int(num_partitions), int(partition_id), int(seed),
                        split)


def _column_array(col: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    shape = []
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) \
            or pa.types.is_fixed_size_list(col.type):
        rows = len(col)
        col = col.flatten()
        shape.append(len(col) // rows if rows else 0)
    return col.to_numpy(zero_copy_only=False).reshape(n, *shape)


def to_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors of a dataset with columns ``x`` and ``label`` (read via Arrow)."""
    table = ds.with_format("arrow")[:]
    n = len(ds)
    x = torch.from_numpy(np.array(_column_array(table["x"], n), dtype=np.float32))
    y = torch.from_numpy(np.array(_column_array(table["label"], n), dtype=np.int64))
    return x, y


def load_dataset_from_path(path: str | os.PathLike, dataset_cfg: Mapping[str, Any],
                           stats: Mapping[str, Any] | None = None) -> Dataset:
    """A node's own data from ``path`` with the columns and normalisation the partitions have.

    The format is inferred from the path: a folder of class sub-folders (image folder),
    ``.csv`` / ``.parquet`` / ``.json`` with ``dataset.label_column``, or ``.npz`` with
    ``x``/``y``. Samples are kept in the target task (its classes, relabelled as in
    ``dataset.target_classes``) so they match the global model's head. Features are
    standardised with the configured statistics or, for ``auto``, the run's (``stats``:
    ``data-mean`` / ``data-std`` as the server sends them), never this data's own.
    """
    cfg = plain(dataset_cfg)
    raw = read_path(path, cfg, key="data-path")
    if raw.test is not None:
        raw = Arrays(np.concatenate([raw.x, raw.test.x]), np.concatenate([raw.y, raw.test.y]),
                     columns=raw.columns)
    where = f"data-path={str(path)!r}"
    raw, _ = standardise.handle_non_finite(raw, cfg, where)
    node = standardise.for_node(cfg, raw.x, stats, where)
    raw.x = standardise.zero_non_finite(_normalise(raw.x, node.config(cfg)), cfg)
    _, tgt, _, tgt_map = _source_target(raw, cfg)
    if tgt_map is not None:
        unknown = sorted(set(raw.y[~tgt].tolist()))
        if unknown:
            log.warning("data-path=%s: dropping labels %s outside dataset.target_classes",
                        path, unknown)
    s = _select(raw, tgt, tgt_map)
    return to_dataset(s.x, s.y, s.groups, cfg.get("group_column"))
