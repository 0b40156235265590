"""Feature standardisation from the training split, and NaN / infinite feature values.

``dataset.mean`` / ``dataset.std``:
- ``auto``: for tables (samples of shape ``(features,)``) the per-feature mean and standard
  deviation of the *training split* (after ``dataset.scale``; the test split never
  contributes; a constant feature gets std 1); images keep ``x * scale`` unchanged;
- ``null``: no shift / no division; a number or one value per channel/feature: as given.

``dataset.nan`` says what a non-finite feature value does: ``error`` (default: refused at
load with the row count, the first row and its column), ``drop`` (those rows are left out)
or ``zero`` (set to 0 after standardisation, i.e. the feature's training mean).

The resolved statistics are written to the run folder (``data.json``) and sent to the
clients in every train/evaluate message (``data-mean`` / ``data-std``), so a node reading
its own ``data-path`` applies the run's statistics, never its own data's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrac.data.sources import Arrays, DataConfigError

NAN_MODES = ("error", "drop", "zero")
AUTO = "auto"
WIRE_KEYS = {"mean": "data-mean", "std": "data-std"}  # ConfigRecord keys sent to clients
_CHUNK = 4096  # rows checked at once (bounded memory on large image sets)


@dataclass
class Standardisation:
    """The resolved ``mean`` / ``std`` (``None``: not applied) and where they come from."""

    mean: list[float] | None
    std: list[float] | None
    auto: bool  # computed from the training split (else configured or not applied)
    rows: int  # training rows the statistics come from (0 when not computed)
    columns: list[str] | None = None

    def config(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``cfg`` with ``mean`` and ``std`` replaced by the resolved values."""
        return {**cfg, "mean": self.mean, "std": self.std}

    def wire(self) -> dict[str, list[float]]:
        """What clients are sent (only statistics computed here; configured ones they have)."""
        if not self.auto:
            return {}
        return {WIRE_KEYS[k]: list(v) for k, v in (("mean", self.mean), ("std", self.std))
                if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "auto": self.auto,
                "training_rows": self.rows, "columns": self.columns}


def check_values(cfg: Mapping[str, Any]) -> str:
    """Check ``dataset.mean`` / ``std`` / ``nan``; return the ``nan`` mode."""
    for key in ("mean", "std"):
        value = cfg.get(key)
        ok = value is None or value == AUTO or _is_number(value) or (
            isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(_is_number(v) for v in value))
        if not ok:
            raise DataConfigError(f"dataset.{key}={value!r} is not allowed; allowed: auto, null, "
                                  "a number, or a list with one number per channel/feature")
    mode = cfg.get("nan") or "error"
    if mode not in NAN_MODES:
        raise DataConfigError(f"dataset.nan={mode!r} is not allowed; allowed: "
                              f"{', '.join(NAN_MODES)}")
    return str(mode)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)


def bad_rows(x: np.ndarray) -> np.ndarray:
    """A boolean mask of the rows of ``x`` holding a NaN or infinite value."""
    if x.dtype.kind not in "fc" or len(x) == 0:
        return np.zeros(len(x), bool)
    flat = x.reshape(len(x), -1)
    return np.concatenate([~np.isfinite(flat[i:i + _CHUNK]).all(axis=1)
                           for i in range(0, len(flat), _CHUNK)])


def _describe(x: np.ndarray, bad: np.ndarray, columns: Sequence[str] | None) -> str:
    first = int(np.flatnonzero(bad)[0])
    col = int(np.flatnonzero(~np.isfinite(x[first].reshape(-1)))[0])
    name = repr(columns[col]) if columns is not None and col < len(columns) else f"#{col}"
    return (f"{int(bad.sum())} of {len(bad)} rows have NaN or infinite feature values "
            f"(first: row {first} (0-based), column {name})")


def handle_non_finite(a: Arrays, cfg: Mapping[str, Any], where: str) -> tuple[Arrays, int]:
    """``a`` (and its test split) checked for non-finite values as ``dataset.nan`` says.

    ``error``: a one-line DataConfigError naming the rows and the column; ``drop``: those
    rows removed; ``zero``: kept (set to 0 by :func:`standardise`). Returns the arrays and
    how many rows were dropped.
    """
    mode = check_values(cfg)
    dropped = 0
    for part, label in ((a, where), (a.test, f"{where} (test split)")):
        if part is None:
            continue
        bad = bad_rows(part.x)
        if not bad.any():
            continue
        if mode == "error":
            raise DataConfigError(f"{label}: {_describe(part.x, bad, a.columns)}; allowed: "
                                  "finite values, or dataset.nan=drop (leave those rows out) "
                                  "or dataset.nan=zero (0 after standardisation)")
        if mode == "drop":
            keep = ~bad
            part.x, part.y = part.x[keep], part.y[keep]
            if part.groups is not None:
                part.groups = part.groups[keep]
            dropped += int(bad.sum())
    return a, dropped


def _scale(x: np.ndarray, cfg: Mapping[str, Any]) -> float:
    scale = cfg.get("scale")
    if scale is None:
        scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    return float(scale)


def fit(train_x: np.ndarray, cfg: Mapping[str, Any],
        columns: Sequence[str] | None = None) -> Standardisation:
    """The statistics to apply: ``auto`` computed per feature from ``train_x`` for tables
    (ignored for images), configured values as given."""
    check_values(cfg)
    table = train_x.ndim == 2
    wants = {k: cfg.get(k) == AUTO for k in ("mean", "std")}
    out: dict[str, list[float] | None] = {}
    if table and any(wants.values()):
        xs = train_x.astype(np.float64) * _scale(train_x, cfg)
        xs[~np.isfinite(xs)] = np.nan
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(xs, axis=0), nan=0.0)
            std = np.nanstd(xs, axis=0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        out = {"mean": mean.tolist(), "std": std.tolist()}
    resolved = {}
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value == AUTO:
            resolved[key] = out.get(key)  # None for images: unchanged
        else:
            resolved[key] = None if value is None else np.atleast_1d(
                np.asarray(value, np.float64)).tolist()
    auto = table and any(wants.values())
    return Standardisation(resolved["mean"], resolved["std"], auto,
                           len(train_x) if auto else 0,
                           list(columns) if columns is not None else None)


def for_node(cfg: Mapping[str, Any], x: np.ndarray, sent: Mapping[str, Any] | None,
             where: str) -> Standardisation:
    """The statistics a node applies to its own data: configured values, else the run's
    (``sent``: ``data-mean`` / ``data-std`` from the server's message); never its own."""
    check_values(cfg)
    sent = sent or {}
    resolved: dict[str, list[float] | None] = {}
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value != AUTO:
            resolved[key] = None if value is None else np.atleast_1d(
                np.asarray(value, np.float64)).tolist()
        elif x.ndim != 2:
            resolved[key] = None  # images: auto changes nothing
        elif WIRE_KEYS[key] in sent:
            resolved[key] = [float(v) for v in sent[WIRE_KEYS[key]]]
        else:
            raise DataConfigError(
                f"{where}: dataset.{key}=auto needs the run's training statistics, which come "
                f"in the server's messages ({WIRE_KEYS[key]}); none were given here: set "
                f"dataset.mean and dataset.std to the lists in the run's data.json")
    return Standardisation(resolved["mean"], resolved["std"], False, 0)


def zero_non_finite(x: np.ndarray, cfg: Mapping[str, Any]) -> np.ndarray:
    """``x`` with NaN / infinite values set to 0 when ``dataset.nan=zero``."""
    if (cfg.get("nan") or "error") == "zero" and x.dtype.kind == "f":
        x = np.where(np.isfinite(x), x, np.float32(0)).astype(x.dtype, copy=False)
    return x


def write_data_json(out_dir: str | Path, info: Mapping[str, Any]) -> Path:
    """``data.json`` in the run folder: the statistics a deployed node must apply."""
    path = Path(out_dir) / "data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)
    return path
