"""Readers that turn a ``dataset`` config into raw arrays, one per source type.

Every reader returns :class:`Arrays` (``x`` with the sample shape kept, ``y``
integer labels, optional group ids and an optional test split). Turning those
into normalised ``datasets.Dataset`` tasks is :mod:`fedrac.data`'s job.
Sources: the embedded ``digits``; ``mnist``, ``fashion_mnist``,
``cifar10``; local ``files`` (image folder, CSV/Parquet/JSON table, ``.npz``);
a Hugging Face ``hub`` id; any callable through Hydra's ``_target_``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "files", "hub", "custom")
TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataConfigError(ValueError):
    """Raised for data settings that cannot work (message names the key)."""


@dataclass
class Arrays:
    """Raw samples: ``x`` (N, *shape), integer ``y`` (N,), optional ``groups`` and test split
    (``columns``: a table's feature names)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    test: Arrays | None = None
    columns: list[str] | None = None


def integer_labels(values: Any, key: str) -> np.ndarray:
    """``values`` as int64 class ids; a one-line error when they are not integers >= 0."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        out = arr.astype(np.int64)
    else:
        bad = next((v for v in arr.ravel().tolist()
                    if not (isinstance(v, int | float) and float(v).is_integer())), arr.ravel()[0])
        raise DataConfigError(f"{key}: labels must be integers (class ids 0..C-1); got {bad!r} "
                              f"({type(bad).__name__}); map them to integers first")
    if out.size and out.min() < 0:
        raise DataConfigError(f"{key}: labels must be integers >= 0; got {int(out.min())}")
    return out


def table_labels(values: Any, key: str) -> np.ndarray:
    """A table's labels: strings kept as they are (mapped to ids with the test split, see
    :func:`fedrac.data.load.build_splits`), anything else as :func:`integer_labels`."""
    values = list(values)
    if values and all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=object)
    return integer_labels(values, key)


# ---------------------------------------------------------------- embedded digits


def read_digits(cfg: Mapping[str, Any]) -> Arrays:
    """scikit-learn's 1,797 handwritten digits as (1, 8, 8) images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return Arrays(x, bunch.target.astype(np.int64))


def read_synthetic(cfg: Mapping[str, Any]) -> Arrays:
    """Gaussian class clusters, a stand-in where only speed matters (DESIGN section 10).

    Classes ``0..k-1`` (``source_samples``) and ``k..2k-1`` (``target_samples``) have
    their own cluster means; the test split has ``test_samples`` of each half. Samples
    have ``features`` values, or the ``shape`` given (e.g. ``[3, 32, 32]``, CIFAR-10's).
    """
    shape = cfg.get("shape")
    if shape is not None and (not isinstance(shape, list | tuple) or not shape
                              or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise DataConfigError(f"dataset.shape={shape!r} is not allowed; allowed: null or a "
                              "list of positive integers such as [3, 32, 32]")
    sample_shape = tuple(shape) if shape is not None else (int(cfg.get("features", 64)),)
    dim, k = int(np.prod(sample_shape)), int(cfg.get("num_classes", 5))
    rng = np.random.default_rng(int(cfg.get("seed", 0)))
    means = rng.standard_normal((2 * k, dim), dtype=np.float32) * 2.0

    def draw(first: int, count: int, x: np.ndarray) -> np.ndarray:
        """Labels of ``count`` samples of classes ``first..``; their values written into ``x``."""
        y = rng.integers(first, first + k, count)
        rng.standard_normal(dtype=np.float32, out=x)
        for i in range(0, count, 4096):  # += means[y] without a temporary of x's size
            x[i:i + 4096] += means[y[i:i + 4096]]
        return y

    n_src, n_tgt = int(cfg.get("source_samples", 2000)), int(cfg.get("target_samples", 50000))
    n_test = int(cfg.get("test_samples", 1000))
    # source and target samples straight into one array each for train and test (no copies)
    x, x_test = np.empty((n_src + n_tgt, dim), np.float32), np.empty((2 * n_test, dim), np.float32)
    y = np.concatenate([draw(0, n_src, x[:n_src]), draw(k, n_tgt, x[n_src:])])
    y_test = np.concatenate([draw(0, n_test, x_test[:n_test]), draw(k, n_test, x_test[n_test:])])
    test = Arrays(x_test.reshape(-1, *sample_shape), y_test)
    return Arrays(x.reshape(-1, *sample_shape), y, test=test)


# ---------------------------------------------------------------- MNIST / CIFAR-10 files

# The files torchvision's MNIST / FashionMNIST / CIFAR10 classes keep under ``root``; fedrac
# reads them itself (IDX and CIFAR's pickled batches), so torchvision is needed only to
# download them (``dataset.download=true``).
_TV_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion_mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "cifar10": ("cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)),
                                        "test_batch", "batches.meta"]),
}


def _present(path: Path) -> Path | None:
    """``path``, or its gzipped twin ``path.gz``, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format; plain or ``.gz``) as an array of its stored shape."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path.name} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path.name} holds {data.size} values, its header says {shape}")
    return data.reshape(shape)


def _read_cifar_batches(paths: Sequence[Path]) -> Arrays:
    import pickle

    xs, ys = [], []
    for path in paths:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="latin1")  # the user's own files, as torchvision
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return Arrays(np.concatenate(xs), np.concatenate(ys))


def _download_torchvision(name: str, root: Path) -> None:
    try:
        import torchvision
    except ImportError as err:
        raise DataConfigError(f"dataset.download=true for {name} needs torchvision; install it "
                              "(pip install torchvision) or put the files under "
                              "dataset.root") from err
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    for train in (True, False):
        cls(str(root), train=train, download=True)


def read_torchvision(cfg: Mapping[str, Any]) -> Arrays:
    """MNIST / Fashion-MNIST / CIFAR-10 from their files under ``dataset.root`` (torchvision's
    layout; downloaded through torchvision only when ``dataset.download=true``)."""
    name = str(cfg["name"])
    root = Path(os.path.expanduser(str(cfg.get("root") or "")))
    folder, files = _TV_FILES[name]
    missing = [f for f in files if _present(root / folder / f) is None]
    if missing and bool(cfg.get("download", False)):
        try:
            _download_torchvision(name, root)
        except DataConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - no network, a broken mirror: one line
            raise DataConfigError(f"dataset.root={str(root)!r}: cannot download {name}: "
                                  f"{str(err).splitlines()[0]}") from err
        missing = [f for f in files if _present(root / folder / f) is None]
    if missing:
        raise DataConfigError(
            f"dataset.root={str(root)!r} lacks the {name} files {', '.join(missing)} in "
            f"{root / folder}; put them there or set dataset.download=true (needs the network)")
    paths = [_present(root / folder / f) for f in files]
    try:
        if name == "cifar10":
            out = _read_cifar_batches(paths[:5])
            out.test = _read_cifar_batches(paths[5:6])
            return out
        x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    except Exception as err:  # noqa: BLE001 - corrupt files: one line either way
        raise DataConfigError(f"dataset.root={str(root)!r}: cannot read {name}: "
                              f"{str(err).splitlines()[0]}") from err
    out = Arrays(np.ascontiguousarray(x_train[:, None]), y_train.astype(np.int64))
    out.test = Arrays(np.ascontiguousarray(x_test[:, None]), y_test.astype(np.int64))
    return out


# ---------------------------------------------------------------- Hugging Face datasets


def _image_to_array(img: Any, size: Sequence[int] | None, mode: str) -> np.ndarray:
    img = img.convert(mode)
    if size:
        from PIL import Image

        img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decoded(ds: Any, column: str) -> list[Any]:
    """The column's images decoded one by one: a file that cannot be read stops with one line
    naming it (``datasets`` would raise its decoder's traceback without the file)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    if not isinstance(ds.features[column], ImageFeature):
        return list(ds[column])
    out = []
    for i, item in enumerate(ds.cast_column(column, ImageFeature(decode=False))[column]):
        where = item.get("path") or f"row {i}"
        try:
            img = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else \
                Image.open(item["path"])
            img.load()
        except Exception as err:  # noqa: BLE001 - any undecodable file: name it
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataConfigError(f"image {where!r} cannot be read ({why}); allowed: image "
                                  "files PIL can open (remove or replace it)") from None
        out.append(img)
    return out


def _images(ds: Any, column: str, cfg: Mapping[str, Any]) -> np.ndarray:
    images = _decoded(ds, column)
    channels = cfg.get("channels")
    if channels is None:
        channels = 1 if all(im.mode in ("L", "1", "I;16", "I", "F") for im in images) else 3
    if int(channels) not in (1, 3):
        raise DataConfigError(f"dataset.channels={channels!r} is not allowed; allowed: 1, 3, null")
    mode = "L" if int(channels) == 1 else "RGB"
    size = cfg.get("image_size")
    if size is not None and isinstance(size, int):
        size = [size, size]
    arrays = [_image_to_array(im, size, mode) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataConfigError(f"dataset.image_size=null but the images have {len(shapes)} sizes "
                              f"(e.g. {sorted(shapes)[:2]}); set dataset.image_size=[H,W]")
    return np.stack(arrays) if arrays else np.zeros((0, int(channels), 1, 1), np.uint8)


def hf_to_arrays(ds: Any, cfg: Mapping[str, Any], where: str) -> Arrays:
    """A ``datasets.Dataset`` as :class:`Arrays`: an ``x`` column, an image column or features."""
    from datasets import Image

    label = str(cfg.get("label_column") or "label")
    cols = list(ds.column_names)
    if label not in cols:
        raise DataConfigError(f"dataset.label_column={label!r} is not a column of {where}; "
                              f"allowed: {', '.join(cols)}")
    group = cfg.get("group_column")
    if group is not None and group not in cols:
        raise DataConfigError(f"dataset.group_column={group!r} is not a column of {where}; "
                              f"allowed: {', '.join(c for c in cols if c != label)}")
    y = table_labels(ds[label], f"dataset.label_column={label!r} of {where}")
    image_col = cfg.get("image_column") or next(
        (c for c in cols if isinstance(ds.features[c], Image)), None)
    features = cfg.get("feature_columns")
    if features is None and "x" in cols and label != "x":
        x = np.asarray(ds.with_format("numpy")["x"], dtype=np.float32)
    elif features is None and image_col is not None:
        if image_col not in cols:
            raise DataConfigError(f"dataset.image_column={image_col!r} is not a column of "
                                  f"{where}; allowed: {', '.join(cols)}")
        x = _images(ds, image_col, cfg)
    else:
        skip = {label, group}
        if features is None:
            features = [c for c in cols if c not in skip
                        and getattr(ds.features[c], "dtype", "") in _NUMERIC]
            _check_left_out(ds, [c for c in cols if c not in skip and c not in features],
                            where)
        bad = [c for c in features if c not in cols]
        if bad:
            raise DataConfigError(f"dataset.feature_columns={list(features)} names columns that "
                                  f"{where} lacks ({', '.join(bad)}); allowed: {', '.join(cols)}")
        if not features:
            raise DataConfigError(f"{where} has no numeric feature columns besides "
                                  f"label_column={label!r}; set dataset.feature_columns")
        table = ds.select_columns(list(features)).with_format("numpy")
        try:
            x = np.stack([np.asarray(table[c], dtype=np.float32) for c in features], axis=1)
        except (TypeError, ValueError) as err:
            raise DataConfigError(f"dataset.feature_columns={list(features)} of {where}: "
                                  f"not numeric ({str(err).splitlines()[0]})") from err
    groups = np.asarray([str(v) for v in ds[group]]) if group is not None else None
    return Arrays(x, y, groups, columns=None if features is None else list(features))


def _number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _check_left_out(ds: Any, columns: Sequence[str], where: str) -> None:
    """Columns that are not numeric are left out of the features: refuse one of mixed types
    (mostly numbers: a typo, not a text column), name the others in a warning."""
    import logging

    for c in columns:
        if getattr(ds.features[c], "dtype", "") not in ("string", "large_string"):
            continue
        values = [v for v in ds[c] if v is not None and str(v).strip() != ""]
        numeric = [_number(v) for v in values]
        if values and sum(numeric) >= len(values) / 2 and not all(numeric):
            row = numeric.index(False)
            raise DataConfigError(f"column {c!r} of {where} mixes numbers and text (row {row}: "
                                  f"{values[row]!r}); allowed: numbers only, or "
                                  "dataset.feature_columns without it")
        logging.getLogger(__name__).warning("column %r of %s is not numeric: left out of the "
                                            "features (dataset.feature_columns to choose)",
                                            c, where)


_NUMERIC = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64", "bool"}


def _check_exists(path: str | os.PathLike, key: str = "dataset.path") -> Path:
    if path is None or str(path) in ("", "???"):
        raise DataConfigError(f"{key}={path!r} is not set; allowed: a folder of class "
                              "sub-folders, a .csv/.parquet/.json/.npz file")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataConfigError(f"{key}={str(path)!r} does not exist; allowed: an existing folder "
                              "of class sub-folders or a .csv/.parquet/.json/.npz file")
    return p


def _read_npz(p: Path, cfg: Mapping[str, Any], key: str) -> Arrays:
    xk, yk = str(cfg.get("x_key") or "x"), str(cfg.get("y_key") or "y")
    try:
        with np.load(p, allow_pickle=False) as z:
            names = list(z.files)
            if yk not in names and yk == "y" and "label" in names:
                yk = "label"
            if xk not in names or yk not in names:
                lacking = xk if xk not in names else yk
                raise DataConfigError(f"{key}={str(p)!r} lacks array {lacking!r} (dataset.x_key/"
                                      f"y_key); it has: {', '.join(names)}")
            x, y = z[xk], z[yk]
            test = None
            if f"{xk}_test" in names and f"{yk}_test" in names:
                test = Arrays(z[f"{xk}_test"], integer_labels(z[f"{yk}_test"], f"{key} {yk}_test"))
    except DataConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable file: one line
        raise DataConfigError(f"{key}={str(p)!r} is not a readable .npz file: "
                              f"{str(err).splitlines()[0]}") from err
    if len(x) != len(y):
        raise DataConfigError(f"{key}={str(p)!r}: {xk} has {len(x)} rows but {yk} has {len(y)}")
    return Arrays(np.asarray(x), integer_labels(y, f"{key}={str(p)!r} array {yk!r}"), test=test)


def _read_imagefolder(p: Path, cfg: Mapping[str, Any], key: str) -> Arrays:
    from datasets import load_dataset

    classes = sorted(c.name for c in p.iterdir() if c.is_dir())
    split_dirs = [c for c in classes if c in ("train", "test")]
    class_root = p / split_dirs[0] if split_dirs else p
    class_dirs = sorted(c.name for c in class_root.iterdir() if c.is_dir())
    if len(class_dirs) < 2:
        raise DataConfigError(f"{key}={str(p)!r} is an image folder with {len(class_dirs)} class "
                              f"sub-folder(s) {class_dirs}; allowed: 2 or more, one per class")
    try:
        dd = load_dataset("imagefolder", data_dir=str(p))
    except Exception as err:  # noqa: BLE001
        raise DataConfigError(f"{key}={str(p)!r}: cannot read the image folder: "
                              f"{str(err).splitlines()[0]}") from err
    out = hf_to_arrays(dd["train"], cfg, f"image folder {str(p)!r}")
    if "test" in dd:
        out.test = hf_to_arrays(dd["test"], cfg, f"image folder {str(p / 'test')!r}")
    return out


def read_path(path: str | os.PathLike, cfg: Mapping[str, Any], key: str = "dataset.path") -> Arrays:
    """Arrays from a local path; the format is inferred from it (folder, table, ``.npz``)."""
    with _quiet_datasets():
        return _read_path(path, cfg, key)


def _read_path(path: str | os.PathLike, cfg: Mapping[str, Any], key: str) -> Arrays:
    p = _check_exists(path, key)
    if p.is_dir():
        data_files = [f for f in sorted(p.iterdir()) if f.is_file()
                      and f.suffix.lower() in {".npz", *TABLE_FORMATS}]
        if len(data_files) == 1 and not any(c.is_dir() for c in p.iterdir()):
            p = data_files[0]  # a folder holding one data file (a node's data folder)
        else:
            return _read_imagefolder(p, cfg, key)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _read_npz(p, cfg, key)
    if suffix in TABLE_FORMATS:
        from datasets import load_dataset

        if not any(line.strip() for line in _head_lines(p, 2)[1 if suffix == ".csv" else 0:]):
            raise DataConfigError(f"{key}={str(p)!r} has no rows (the file is empty"
                                  f"{' or only a header' if suffix == '.csv' else ''}); "
                                  "allowed: a table with rows")
        try:
            ds = load_dataset(TABLE_FORMATS[suffix], data_files=str(p), split="train")
        except Exception as err:  # noqa: BLE001
            bad = _bad_json_line(p) if suffix in (".json", ".jsonl") else None
            raise DataConfigError(f"{key}={str(p)!r} is not a readable {suffix} table: "
                                  + (bad or str(err).splitlines()[0])) from None
        return hf_to_arrays(ds, cfg, f"{str(p)!r}")
    raise DataConfigError(f"{key}={str(p)!r} has an unknown format {suffix!r}; allowed: a folder "
                          "of class sub-folders, .csv, .parquet, .json, .jsonl, .npz")


def _head_lines(p: Path, n: int) -> list[str]:
    if p.suffix.lower() == ".parquet":
        return ["", "x"]  # binary: load_dataset reports an empty one
    with open(p, encoding="utf-8", errors="replace") as fh:
        return [line for _, line in zip(range(n), fh, strict=False)]


def _bad_json_line(p: Path) -> str | None:
    """``line N is not JSON (...)``: the first bad line of a JSON-lines file, or where a JSON
    document breaks (``None`` when the file parses: the problem is elsewhere)."""
    import json

    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as whole:
        lines = text.splitlines()
        first = next((line for line in lines if line.strip()), "")
        try:
            json.loads(first)
        except ValueError:  # one multi-line document
            return f"line {whole.lineno} is not JSON ({whole.msg})"
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {n} is not JSON ({err.msg})"
    return None


def read_files(cfg: Mapping[str, Any]) -> Arrays:
    """``dataset.path`` (and optional ``dataset.test_path``) read with :func:`read_path`."""
    out = _read_path(cfg.get("path"), cfg, "dataset.path")
    if cfg.get("test_path"):
        out.test = _read_path(cfg["test_path"], cfg, "dataset.test_path")
    return out


def read_hub(cfg: Mapping[str, Any]) -> Arrays:
    """A Hugging Face hub dataset (needs the network or the local HF cache)."""
    from datasets import load_dataset

    hub_id = cfg.get("path")
    if not hub_id:
        raise DataConfigError("dataset.path=None is not set; allowed: a Hugging Face hub id "
                              "such as 'ylecun/mnist'")
    split, test_split = str(cfg.get("split", "train")), cfg.get("test_split")
    try:
        ds = load_dataset(str(hub_id), cfg.get("subset"), split=split)
        test = load_dataset(str(hub_id), cfg.get("subset"), split=str(test_split)) \
            if test_split else None
    except Exception as err:  # noqa: BLE001 - offline, unknown id, unknown split
        raise DataConfigError(f"dataset.path={hub_id!r}: cannot load it from the Hugging Face "
                              f"hub: {str(err).splitlines()[0]}") from err
    out = hf_to_arrays(ds, cfg, f"hub dataset {hub_id!r}")
    if test is not None:
        out.test = hf_to_arrays(test, cfg, f"hub dataset {hub_id!r} split {test_split!r}")
    return out


def _torch_to_arrays(ds: Any, where: str) -> Arrays:
    import torch

    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise DataConfigError(f"{where}: item {i} is {type(item).__name__}; "
                                  "allowed: (x, label) pairs")
        x, y = item[0], item[1]
        xs.append(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        ys.append(int(y) if not isinstance(y, torch.Tensor) else y.item())
    return Arrays(np.stack(xs), integer_labels(ys, where))


def read_target(cfg: Mapping[str, Any]) -> Arrays:
    """The data returned by ``dataset._target_`` (a ``datasets.Dataset``, a torch ``Dataset``,
    or a mapping with ``train`` and optional ``test`` of either)."""
    from datasets import Dataset as HFDataset
    from hydra.utils import instantiate

    target = cfg["_target_"]
    try:
        obj = instantiate({"_target_": target, **(cfg.get("kwargs") or {})})
    except Exception as err:  # noqa: BLE001 - import errors and the callable's own errors
        raise DataConfigError(f"dataset._target_={target!r} failed: "
                              f"{str(err).splitlines()[0]}") from err
    where = f"dataset._target_={target!r}"

    def convert(o: Any) -> Arrays:
        if isinstance(o, HFDataset):
            return hf_to_arrays(o, cfg, where)
        if hasattr(o, "__getitem__") and hasattr(o, "__len__"):
            return _torch_to_arrays(o, where)
        raise DataConfigError(f"{where} returned {type(o).__name__}; allowed: a datasets.Dataset, "
                              "a torch.utils.data.Dataset, or a dict with 'train' (and 'test')")

    if isinstance(obj, Mapping):
        if "train" not in obj:
            raise DataConfigError(f"{where} returned a mapping without 'train'; "
                                  f"it has: {', '.join(map(str, obj))}")
        out = convert(obj["train"])
        if obj.get("test") is not None:
            out.test = convert(obj["test"])
        return out
    return convert(obj)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the ``datasets`` progress bars while reading (restored afterwards)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def read_source(cfg: Mapping[str, Any]) -> Arrays:
    """Dispatch on ``dataset._target_`` or ``dataset.name``."""
    with _quiet_datasets():
        return _dispatch(cfg)


def _dispatch(cfg: Mapping[str, Any]) -> Arrays:
    if cfg.get("_target_"):
        return read_target(cfg)
    name = cfg.get("name")
    if name == "digits":
        return read_digits(cfg)
    if name == "synthetic":
        return read_synthetic(cfg)
    if name in _TV_FILES:
        return read_torchvision(cfg)
    if name == "files":
        return read_files(cfg)
    if name == "hub":
        return read_hub(cfg)
    if name == "custom":
        raise DataConfigError("dataset._target_=None is not set; allowed: the dotted path of a "
                              "callable returning a dataset, e.g. my_data.load")
    raise DataConfigError(f"dataset.name={name!r} is not a dataset; allowed: {', '.join(SOURCES)}"
                          " or a dataset config with _target_")
