"""Reproducible pretraining on the source data, cached as safetensors.

Pretraining uses the run's task (loss and batching), like the clients. A transformers
model (``model=hf``) starts from its checkpoint: with ``pretrain.epochs=0`` (its default)
its weights are used as they are, without a cache file.

A cache entry is named by a hash of everything that shapes the weights: the model, dataset
and pretraining settings, torch's version, the bytes of ``model.weights``, the local data
files' stamps and the source file of every ``_target_`` (a custom model or dataset: editing
its code makes a new entry). Each entry stores the SHA-256 of its tensors; an entry that
cannot be read or does not match (altered bytes, a truncated file) is rebuilt with a
warning naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors import safe_open
from safetensors.torch import save_file

from fedrac.adapters.quantized import dense_items
from fedrac.data import load_splits, source_stamp, to_tensors
from fedrac.data.holdout import without_holdout
from fedrac.models import ModelConfigError, build_model, file_digest, load_weights
from fedrac.models.shared import model_as_built
from fedrac.models.weights import state_digest
from fedrac.tasks import get_task
from fedrac.training.local import TrainSettings, evaluate, resolve_device, train_locally
from fedrac.wire.records import numpy_to_array, to_array_record, to_shared_state_dict

log = logging.getLogger(__name__)
CACHE_FORMAT = 3  # 2: entries carry the SHA-256 of their tensors; keys hash `_target_` code;
#                  3: pretrained on one intra-op thread (weights independent of the machine)
PRETRAIN_THREADS = 1  # the thread count changes float sums: a fresh cache must not depend on it
DIGEST_KEY = "fedrac.sha256"  # safetensors metadata key of that digest


def _targets(cfg: Any) -> Iterator[str]:
    """Every ``_target_`` string in a (nested) config."""
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            if key == "_target_" and isinstance(value, str):
                yield value
            else:
                yield from _targets(value)
    elif isinstance(cfg, list | tuple):
        for value in cfg:
            yield from _targets(value)


def code_stamp(*cfgs: Mapping[str, Any]) -> dict[str, str]:
    """``{target: sha256 of the source file that defines it}`` for every ``_target_`` in
    ``cfgs`` (``"unavailable"`` when it cannot be imported or has no source file)."""
    from hydra.utils import get_object

    stamps = {}
    for target in sorted({t for cfg in cfgs for t in _targets(cfg)}):
        try:
            obj = get_object(target)
            source = inspect.getsourcefile(obj) or inspect.getfile(obj)
            stamps[target] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        except Exception:  # noqa: BLE001 - building the model reports the real error
            stamps[target] = "unavailable"
    return stamps


def read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state dict at ``path``, or ``None`` (with a warning naming the file) when the
    entry is damaged: unreadable, truncated, without its digest, or not matching it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get(DIGEST_KEY)
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        problem = ("has no checksum" if digest is None else
                   "does not match its checksum" if state_digest(state) != digest else None)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged entry
        problem = f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if problem is None:
        return state
    log.warning("pretrained-weights cache %s %s; rebuilding it", path, problem)
    return None


def write_cache(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` with its digest atomically (temporary file + rename) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(state), tmp, metadata={DIGEST_KEY: state_digest(state)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_path(cache_dir: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir).expanduser() / f"pretrained-{key['model'].get('name', 'custom')}-" \
        f"{key['dataset'].get('name', 'custom')}-{digest[:12]}.safetensors"


@functools.lru_cache(maxsize=1)
def _checkpoint_record(key: str) -> ArrayRecord:
    """A transformers model's starting weights (float32) as a record, built once per process
    (the record is the one copy of them the run keeps: :func:`pretrained_state` reads views
    of it)."""
    model, _ = model_as_built(key)  # the process's model when still as built: no second one
    record = ArrayRecord()
    for k, v in dense_items(model):  # a quantised layer dequantised, encoded, then freed
        record[k] = numpy_to_array((v.detach().float() if v.is_floating_point() else v.detach())
                                   .cpu().contiguous().numpy())
    return record


def pretrained_record(
    model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any],
    pretrain_cfg: Mapping[str, Any], cache_dir: str | os.PathLike,
) -> ArrayRecord:
    """:func:`pretrained_state` as a Flower record (for a transformers checkpoint, the very
    record the process keeps: no further copy)."""
    dataset_cfg = without_holdout(dataset_cfg)  # pretraining reads the source splits only
    if model_cfg.get("name") == "hf" and int(pretrain_cfg.get("epochs", 0)) == 0:
        return _checkpoint_record(_checkpoint_key(model_cfg, dataset_cfg))
    return to_array_record(pretrained_state(model_cfg, dataset_cfg, pretrain_cfg, cache_dir))


def _checkpoint_key(model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> str:
    return json.dumps([model_cfg, dataset_cfg], sort_keys=True, default=str)


def pretrained_state(
    model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any],
    pretrain_cfg: Mapping[str, Any], cache_dir: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """The model's weights after pretraining on the source data (computed once, then cached).

    Floating-point weights are float32 whatever ``model.dtype`` (the server's master copy).
    A transformers checkpoint's are read-only views of :func:`pretrained_record`'s record.
    """
    dataset_cfg = without_holdout(dataset_cfg)  # pretraining reads the source splits only
    if model_cfg.get("name") == "hf" and int(pretrain_cfg.get("epochs", 0)) == 0:
        return dict(to_shared_state_dict(_checkpoint_record(
            _checkpoint_key(model_cfg, dataset_cfg))))
    key = {"model": dict(model_cfg), "dataset": dict(dataset_cfg), "pretrain": dict(pretrain_cfg),
           "torch": torch.__version__.split("+")[0], "format": CACHE_FORMAT}
    if code := code_stamp(model_cfg, dataset_cfg):
        key["code"] = code
    if model_cfg.get("weights"):
        key["weights_sha256"] = file_digest(model_cfg["weights"])
    if source_stamp(dataset_cfg):
        key["data_files"] = source_stamp(dataset_cfg)
    path = _cache_path(cache_dir, key)
    if path.exists() and (cached := read_cache(path)) is not None:
        untrained = path.with_name(path.name + UNTRAINED).exists()
        log.info("%s weights from cache %s", "initial (never pretrained)" if untrained
                 else "pretrained", path)
        if untrained:
            warn_untrained(model_cfg, dataset_cfg, pretrain_cfg)
        return cached
    splits = load_splits(dataset_cfg)
    task = get_task(str(model_cfg.get("task") or dataset_cfg.get("task") or "classification"))
    torch.manual_seed(int(pretrain_cfg.get("seed", 0)))
    model = build_model(model_cfg, splits.input_shape, splits.num_classes)
    if model_cfg.get("weights"):
        load_weights(model, model_cfg["weights"])
    pretrained = bool(model_cfg.get("weights")) or model_cfg.get("name") == "hf"
    if int(pretrain_cfg.get("epochs", 0)) > 0 and len(splits.source_train):
        pretrained = True
        x, y = to_tensors(splits.source_train)
        settings = TrainSettings(
            optimizer=str(pretrain_cfg.get("optimizer", "adamw")),
            lr=float(pretrain_cfg.get("lr", 0.01)),
            local_epochs=int(pretrain_cfg["epochs"]),
            batch_size=int(pretrain_cfg.get("batch_size", 32)),
        )
        device = resolve_device("cpu")
        threads = torch.get_num_threads()
        torch.set_num_threads(PRETRAIN_THREADS)  # the same weights on every machine and load
        try:
            result = train_locally(model, x, y, settings, seed=int(pretrain_cfg.get("seed", 0)),
                                   device=device, task=task)
        finally:
            torch.set_num_threads(threads)
        xt, yt = to_tensors(splits.source_test)
        _, acc = evaluate(model, xt, yt, device, task=task)
        log.info("pretrained on the source task: train loss %.4f, source test accuracy %.4f "
                 "(%.1f s)", result.loss, acc, result.seconds)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             .contiguous().clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ModelConfigError(
            f"pretraining on the source task gave non-finite weights ({bad[0]}) with "
            f"pretrain.lr={pretrain_cfg.get('lr')!r}; allowed: settings under which it "
            "converges (a smaller pretrain.lr)")
    write_cache(path, state)
    marker = path.with_name(path.name + UNTRAINED)
    if pretrained:
        marker.unlink(missing_ok=True)
        log.info("pretrained weights cached at %s", path)
    else:
        marker.touch()
        log.info("initial weights (never pretrained) cached at %s", path)
        warn_untrained(model_cfg, dataset_cfg, pretrain_cfg)
    return state


UNTRAINED = ".untrained"  # beside a cache file: its weights were never pretrained
_warned: set[str] = set()


def warn_untrained(model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any],
                   pretrain_cfg: Mapping[str, Any]) -> None:
    """Warn (once per process and data set) that fine-tuning starts from random weights."""
    name = str(dataset_cfg.get("name") or dataset_cfg.get("_target_"))
    if name in _warned:
        return
    _warned.add(name)
    why = "pretrain.epochs=0" if int(pretrain_cfg.get("epochs", 0)) <= 0 else \
        "the data set has no source part to pretrain on"
    log.warning("model %s was never pretrained (%s): fine-tuning starts from random weights, "
                "and adapter strategies (LoRA, rac_lora, ...) then train low-rank updates of "
                "random layers. Give a source part (dataset.source_classes, or source files), "
                "model.weights=<file.safetensors>, or compare with strategy=fedavg",
                model_cfg.get("name") or model_cfg.get("_target_"), why)
