"""Data splits as ``datasets.Dataset`` objects: normalisation, source/target splits, partitions.

A source (see :mod:`fedrac.data.sources`) gives raw arrays; this module normalises them
(``x * scale``, then ``(x - mean) / std`` per channel or feature), splits off a test
set, and splits classes (or groups) into a *source* task, used for pretraining,
and a *target* task, fine-tuned federatedly. The embedded default is
scikit-learn's digits: pretrain on 0-4, fine-tune on 5-9 (relabelled 0-4).
Every dataset has the columns ``x`` (float32, sample shape kept) and ``label``
(int64), plus the ``group_column`` when one is set. String labels (tables and text) are
mapped to ids (``dataset.label_names``, else their sorted values). Text datasets
(``dataset.text_column``) are tokenised instead (:mod:`fedrac.data.text`) and have the
columns ``input_ids`` (...) and ``label``.

(What a model is trained *for* -- loss, metrics, batching -- is a *task*:
:mod:`fedrac.tasks`. The source/target data here are :class:`DataSplits`.)
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
from fedrac.data.sources import (
    SOURCES,
    Arrays,
    DataConfigError,
    _quiet_datasets,
    read_path,
    read_source,
)

DATASETS = SOURCES


log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    """The data of an adaptation: source data to pretrain on, target data to fine-tune on.

    ``label_names[i]`` names class id ``i`` when the labels were strings (else ``None``).
    """

    source_train: Dataset
    source_test: Dataset
    target_train: Dataset
    target_test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    label_names: list[str] | None = None
    standardisation: standardise.Standardisation | None = None


def _nested(a: np.ndarray) -> pa.Array:
    """``a`` (N, d1, ..., dk) as an Arrow array of N nested fixed-size lists, sharing its buffer."""
    arr = pa.array(a.reshape(-1))
    for d in reversed(a.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(d))
    return arr


def to_dataset(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
               group_column: str | None = None) -> Dataset:
    """A ``datasets.Dataset`` with columns ``x`` (float32), ``label`` (int64) and the group ids.

    The Arrow table is built on the arrays' own buffers (``x`` nested fixed-size lists, no
    copy when ``x`` is already contiguous float32), and its fingerprint is a hash of those
    bytes: ``Dataset.from_dict`` would copy ``x`` through Python lists and pickle it to
    fingerprint it (16 s and 4 GB for 50,000 CIFAR-sized samples).
    """
    import xxhash
    from datasets.table import InMemoryTable

    xs = np.ascontiguousarray(x, dtype=np.float32)
    ys = np.ascontiguousarray(y, dtype=np.int64)
    columns: dict[str, pa.Array] = {"x": _nested(xs), "label": pa.array(ys)}
    digest = xxhash.xxh3_64()
    for a in (xs, ys):
        digest.update(repr((a.dtype.str, a.shape)).encode())
        digest.update(a.reshape(-1).view(np.uint8))
    if group_column is not None and groups is not None:
        gs = np.asarray(groups).astype(str)
        columns[group_column] = pa.array(gs)
        digest.update("\0".join(gs.tolist()).encode())
    return Dataset(InMemoryTable(pa.table(columns)), fingerprint=digest.hexdigest())


def _normalise(x: np.ndarray, cfg: Mapping[str, Any]) -> np.ndarray:
    scale = cfg.get("scale")
    if scale is None:
        scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    # no copy of float32 data unless something changes it, and then one copy, not one per step
    out = x.astype(np.float32, copy=False)
    if float(scale) != 1.0:
        out = out * np.float32(scale)
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
        if out is x:  # never change the caller's array: the first change copies
            out = out - v if key == "mean" else out / v
        elif key == "mean":
            np.subtract(out, v, out=out)
        else:
            np.divide(out, v, out=out)
    return out


def _class_map(classes: Sequence[int] | None) -> dict[int, int] | None:
    return None if classes is None else {int(c): i for i, c in enumerate(classes)}


def _select(a: Arrays, keep: np.ndarray, mapping: dict[int, int] | None) -> Arrays:
    rows = np.flatnonzero(keep)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # one block of rows: views, no copy
        block = slice(int(rows[0]), int(rows[-1]) + 1)
        x, y, groups = a.x[block], a.y[block], None if a.groups is None else a.groups[block]
    else:
        x, y, groups = a.x[keep], a.y[keep], None if a.groups is None else a.groups[keep]
    if mapping is not None:
        keys = np.array(sorted(mapping), dtype=np.int64)
        values = np.array([mapping[int(k)] for k in keys], dtype=np.int64)
        y = values[np.searchsorted(keys, y)]  # every kept label is a key
    return Arrays(x, y, groups)


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


def _map_labels(raw: Arrays, cfg: Mapping[str, Any]) -> list[str] | None:
    """Map string labels of ``raw`` (and its test split) to ids in place; the names."""
    from fedrac.data.text import label_ids, label_names_of

    test_y = raw.test.y if raw.test is not None else None
    strings = [a for a in (raw.y, test_y) if a is not None and a.dtype.kind in "USO"]
    if not strings and not cfg.get("label_names"):
        return None
    names = label_names_of(cfg, raw.y.tolist(), None if test_y is None else test_y.tolist())
    key = f"dataset.label_column={cfg.get('label_column') or 'label'!r}"
    raw.y = label_ids(raw.y, names, key)
    if raw.test is not None:
        raw.test.y = label_ids(raw.test.y, names, key + " (test)")
    return names


def _class_ids(cfg: Mapping[str, Any], names: list[str] | None) -> dict[str, Any]:
    """``cfg`` with class names in source_classes / target_classes replaced by their ids."""
    out = dict(cfg)
    for key in ("source_classes", "target_classes"):
        value = cfg.get(key)
        if value is None or names is None or not any(isinstance(v, str) for v in value):
            continue
        unknown = [v for v in value if str(v) not in names]
        if unknown:
            raise DataConfigError(f"dataset.{key}={list(value)} names unknown labels {unknown}; "
                                  f"allowed: {', '.join(names)}")
        out[key] = [names.index(str(v)) for v in value]
    return out


def build_splits(cfg: Mapping[str, Any]) -> DataSplits:
    """The data splits of a ``dataset`` config (uncached; see :func:`load_splits`)."""
    from fedrac.data.text import is_text

    if is_text(cfg):
        return build_text_splits(cfg)
    raw = read_source(cfg)
    label_names = _map_labels(raw, cfg)
    cfg = _class_ids(cfg, label_names)
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
    classes = np.unique(np.asarray(parts["target_train"]["label"]))
    if len(classes) < 2:
        raise DataConfigError(f"dataset {cfg.get('name')!r} ({_where(cfg)}) has one class in "
                              f"its target training split (label {int(classes[0])}); allowed: "
                              "2 or more classes")
    return DataSplits(**parts, input_shape=tuple(int(d) for d in raw.x.shape[1:]),
                      num_classes=num_classes, label_names=label_names,
                      standardisation=stats)


def build_text_splits(cfg: Mapping[str, Any]) -> DataSplits:
    """Text data splits: the table read, labels mapped, rows tokenised once, then split."""
    from fedrac.data.text import (
        check_columns,
        finish_split,
        label_names_of,
        read_text_tables,
        text_arrays,
        text_columns,
        tokenize,
    )

    task = str(cfg.get("task") or "classification")
    text_columns(cfg, task)  # the keys' own errors before reading anything
    with _quiet_datasets():
        train_table, test_table = read_text_tables(cfg)
    where = f"dataset {cfg.get('name')!r} ({cfg.get('path') or cfg.get('_target_')})"
    cols = text_columns(cfg, task, train_table.column_names, where)
    check_columns(train_table, cols, where)
    if test_table is not None:
        check_columns(test_table, cols, where + " test split")
    names = None
    if task == "classification":
        names = label_names_of(cfg, train_table[cols["label"]],
                               None if test_table is None else test_table[cols["label"]])
    cfg = _class_ids(cfg, names)
    tokenised = tokenize(train_table, cfg, task, cols)
    raw = text_arrays(train_table, cols, names, task, where)
    if test_table is not None:
        tokenised_test = tokenize(test_table, cfg, task, cols)
        raw.test = text_arrays(test_table, cols, names, task, where + " test split")
        train, test = raw, raw.test
        test_source = tokenised_test
    else:
        train, test = _split_test(raw, cfg)
        test_source = tokenised
    keep = [cols["group"]] if "group" in cols else []
    parts = {}
    for split, a, source in (("train", train, tokenised), ("test", test, test_source)):
        src, tgt, src_map, tgt_map = _source_target(a, cfg) if task == "classification" \
            else _group_masks(a, cfg)
        for role, mask, mapping in (("source", src, src_map), ("target", tgt, tgt_map)):
            parts[f"{role}_{split}"] = finish_split(source, _select(a, mask, mapping), keep)
    if len(parts["target_train"]) == 0:
        raise DataConfigError(f"dataset {cfg.get('name')!r} leaves no target training rows; "
                              "check dataset.target_classes / target_groups")
    if task == "classification":
        _, _, _, tgt_map = _source_target(train, cfg)
        num_classes = _num_classes(cfg, raw, tgt_map)
        if names is not None and tgt_map is not None:
            names = [names[c] for c in tgt_map]
    else:
        num_classes = 1
    return DataSplits(**parts, input_shape=(), num_classes=num_classes, label_names=names)


def _group_masks(a: Arrays, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, None, None]:
    """Source/target masks of unlabelled rows: by group (``source_groups``), else all target."""
    if cfg.get("source_groups") is not None or cfg.get("target_groups") is not None:
        return _source_target(a, {k: v for k, v in cfg.items()
                                  if k not in ("source_classes", "target_classes")})
    return np.zeros(len(a.y), bool), np.ones(len(a.y), bool), None, None



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
def _load_splits_cached(key: str) -> DataSplits:
    cfg = json.loads(key)
    splits = build_splits(cfg)
    sizes = (len(splits.target_train), len(splits.target_test), len(splits.source_train),
             len(splits.source_test))
    if cfg.get("task") == "causal_lm":  # no classes: sequences (tokens in the partition summary)
        log.info("dataset: text for causal_lm, sequences: target %d train / %d test, source "
                 "%d / %d", *sizes)
    else:
        log.info("dataset: input shape %s, %d classes, target %d train / %d test, source "
                 "%d / %d", splits.input_shape, splits.num_classes, *sizes)
    return splits


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


def load_splits(dataset_cfg: Mapping[str, Any]) -> DataSplits:
    """The source/target splits of the ``dataset`` config group (cached per process); with
    ``validation_split``, the target test split is carved from the training rows
    (:mod:`fedrac.data.holdout`)."""
    from fedrac.data.holdout import KEY

    if dataset_cfg.get(KEY):
        return _carved_cached(_key(dict(dataset_cfg)))
    return _load_splits_cached(_key(dict(dataset_cfg)))


@functools.lru_cache(maxsize=2)
def _carved_cached(key: str) -> DataSplits:
    from fedrac.data.holdout import KEY, carve, without_holdout

    cfg = json.loads(key)
    return carve(load_splits(without_holdout(cfg)), cfg[KEY])


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


def to_tensors(ds: Dataset) -> tuple[Any, torch.Tensor | None]:
    """``(x, y)`` tensors of a dataset with columns ``x`` and ``label`` (read via Arrow).

    A tokenised text dataset gives ``(TokenData, labels)`` (padded per batch by the task).
    """
    if "input_ids" in ds.column_names:
        from fedrac.data.text import token_data

        x = token_data(ds)
        return x, x.labels
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
    from fedrac.data.text import is_text

    cfg = plain(dataset_cfg)
    if is_text(cfg):
        return _text_from_path(path, cfg)
    raw = read_path(path, cfg, key="data-path")
    if raw.test is not None:
        raw = Arrays(np.concatenate([raw.x, raw.test.x]), np.concatenate([raw.y, raw.test.y]),
                     columns=raw.columns)
    _warn_own_names(raw.y, cfg, path)
    cfg = _class_ids(cfg, _map_labels(raw, cfg))
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


def _warn_own_names(y: Any, cfg: Mapping[str, Any], path: Any) -> None:
    if np.asarray(y).dtype.kind in "USO" and not cfg.get("label_names"):
        log.warning("data-path=%s has string labels and dataset.label_names is not set: they "
                    "are mapped in sorted order, which matches the other nodes only if every "
                    "node holds every label", path)


def _text_from_path(path: Any, cfg: Mapping[str, Any]) -> Dataset:
    """A node's own text table, tokenised as the run's splits are (target rows only)."""
    from fedrac.data.text import (
        _read_table,
        check_columns,
        finish_split,
        label_names_of,
        text_arrays,
        text_columns,
        tokenize,
    )

    task = str(cfg.get("task") or "classification")
    text_columns(cfg, task)  # the keys' own errors before reading anything
    with _quiet_datasets():
        table = _read_table(path, "data-path")
    cols = text_columns(cfg, task, table.column_names, f"data-path={str(path)!r}")
    check_columns(table, cols, f"data-path={str(path)!r}")
    names = None
    if task == "classification":
        _warn_own_names(table[cols["label"]], cfg, path)
        names = label_names_of(cfg, table[cols["label"]])
    cfg = _class_ids(cfg, names)
    raw = text_arrays(table, cols, names, task, f"data-path={str(path)!r}")
    _, tgt, _, tgt_map = _source_target(raw, cfg) if task == "classification" else \
        _group_masks(raw, cfg)
    return finish_split(tokenize(table, cfg, task, cols), _select(raw, tgt, tgt_map),
                        [cols["group"]] if "group" in cols else [])
