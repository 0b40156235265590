"""Weights files: read a ``.safetensors`` / ``.pt`` state dict, load it strictly, digest it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedrac.models.errors import ModelConfigError


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or ``.pt``/``.pth`` file (one-line error if not)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ModelConfigError(f"model.weights={str(path)!r} does not exist; allowed: a "
                               ".safetensors or .pt file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelConfigError(f"model.weights={str(path)!r} is not a readable state dict: "
                               f"{str(err).splitlines()[0]}") from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ModelConfigError(f"model.weights={str(path)!r} holds {type(state).__name__}, "
                               "not a state dict of tensors")
    return dict(state)


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ``path`` into ``model`` strictly; one line naming missing/unexpected/mis-shaped keys."""
    state = read_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", shapes)) if items]
        raise ModelConfigError(f"model.weights={str(path)!r} does not fit the model: "
                               + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's keys, dtypes, shapes and bytes (the integrity check of a
    weights cache entry)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (part of the pretraining cache key); "" when it is missing."""
    import hashlib

    p = Path(os.path.expanduser(str(path)))
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
