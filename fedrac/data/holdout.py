"""A validation split carved out of the target training data (``tune=lr``'s trials).

A dataset config holding ``validation_split: {fraction, seed}`` gives splits whose
``target_test`` is a seeded, stratified share of the target *training* rows and whose
``target_train`` is the rest: a run on it is scored on validation data and never reads the
test split. The source splits (pretraining) are those of the plain config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

KEY = "validation_split"


def without_holdout(dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``dataset_cfg`` without its validation split (the data it is carved from)."""
    return {k: v for k, v in dataset_cfg.items() if k != KEY}


def validation_size(n: int, fraction: float) -> int:
    """Rows of ``n`` training rows that go to validation."""
    return int(np.floor(float(fraction) * n))


def validation_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the validation rows among ``len(labels)`` training rows
    (stratified by label when every class can give one row to each side)."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_val = validation_size(n, fraction)
    if n_val < 1 or n_val >= n:
        return np.zeros(0, dtype=np.int64)
    counts = np.unique(labels, return_counts=True)[1]
    stratify = labels if counts.min() >= 2 and len(counts) <= min(n_val, n - n_val) else None
    _, val = train_test_split(np.arange(n), test_size=n_val, stratify=stratify,
                              random_state=int(seed))
    return np.sort(val).astype(np.int64)


def training_labels(ds: Any) -> np.ndarray:
    """The ``label`` column of a split (row numbers when it has none: causal LM text)."""
    from fedrac.data.columns import column_values

    if "label" in ds.column_names:
        values = column_values(ds, "label")
        if values.ndim == 1:
            return values
    return np.arange(len(ds))  # unique per row: no stratification


def carve(splits: Any, spec: Mapping[str, Any]) -> Any:
    """``splits`` with ``target_test`` replaced by the validation rows of ``target_train``
    and ``target_train`` by the others (``spec``: ``fraction`` and ``seed``)."""
    train = splits.target_train
    val = validation_rows(training_labels(train), float(spec["fraction"]), int(spec["seed"]))
    keep = np.setdiff1d(np.arange(len(train)), val)
    return dataclasses.replace(splits, target_train=train.select(keep),
                               target_test=train.select(val))
