"""Reproducible pretraining on the source data, cached as safetensors.

Pretraining uses the run's task (loss and batching), like the clients. A transformers
model (``model=hf``) starts from its checkpoint: with ``pretrain.epochs=0`` (its default)
its weights are used as they are, without a cache file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clients.local_training import TrainSettings, evaluate, resolve_device, train_locally
from fedrac.data import load_splits, source_stamp, to_tensors
from fedrac.models import build_model, file_digest, load_weights
from fedrac.tasks import get_task

log = logging.getLogger(__name__)


def _cache_path(cache_dir: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir).expanduser() / f"pretrained-{key['model'].get('name', 'custom')}-" \
        f"{key['dataset'].get('name', 'custom')}-{digest[:12]}.safetensors"


@functools.lru_cache(maxsize=1)
def _checkpoint_state(key: str) -> dict[str, torch.Tensor]:
    """A transformers model's starting weights (float32), built once per process."""
    model_cfg, dataset_cfg = json.loads(key)
    splits = load_splits(dataset_cfg)
    model = build_model(model_cfg, splits.input_shape, splits.num_classes)
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            .contiguous().clone() for k, v in model.state_dict().items()}


def pretrained_state(
    model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any],
    pretrain_cfg: Mapping[str, Any], cache_dir: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """The model's weights after pretraining on the source data (computed once, then cached).

    Floating-point weights are float32 whatever ``model.dtype`` (the server's master copy).
    """
    if model_cfg.get("name") == "hf" and int(pretrain_cfg.get("epochs", 0)) == 0:
        return dict(_checkpoint_state(json.dumps([model_cfg, dataset_cfg], sort_keys=True,
                                                 default=str)))
    key = {"model": dict(model_cfg), "dataset": dict(dataset_cfg), "pretrain": dict(pretrain_cfg),
           "torch": torch.__version__.split("+")[0]}
    if model_cfg.get("weights"):
        key["weights_sha256"] = file_digest(model_cfg["weights"])
    if source_stamp(dataset_cfg):
        key["data_files"] = source_stamp(dataset_cfg)
    path = _cache_path(cache_dir, key)
    if path.exists():
        log.info("pretrained weights from cache %s", path)
        return load_file(str(path))
    splits = load_splits(dataset_cfg)
    task = get_task(str(model_cfg.get("task") or dataset_cfg.get("task") or "classification"))
    torch.manual_seed(int(pretrain_cfg.get("seed", 0)))
    model = build_model(model_cfg, splits.input_shape, splits.num_classes)
    if model_cfg.get("weights"):
        load_weights(model, model_cfg["weights"])
    if int(pretrain_cfg.get("epochs", 0)) > 0 and len(splits.source_train):
        x, y = to_tensors(splits.source_train)
        settings = TrainSettings(
            optimizer=str(pretrain_cfg.get("optimizer", "adamw")),
            lr=float(pretrain_cfg.get("lr", 0.01)),
            local_epochs=int(pretrain_cfg["epochs"]),
            batch_size=int(pretrain_cfg.get("batch_size", 32)),
        )
        device = resolve_device("cpu")
        result = train_locally(model, x, y, settings, seed=int(pretrain_cfg.get("seed", 0)),
                               device=device, task=task)
        xt, yt = to_tensors(splits.source_test)
        _, acc = evaluate(model, xt, yt, device, task=task)
        log.info("pretrained on the source task: train loss %.4f, source test accuracy %.4f "
                 "(%.1f s)", result.loss, acc, result.seconds)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             .contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, path)
    log.info("pretrained weights cached at %s", path)
    return state
