"""Model factories: ``mlp``, a small ``cnn``, ``vit_tiny``, or any ``nn.Module`` via ``_target_``.

Every factory takes the task's ``input_shape`` (without the batch dimension) and
``num_classes``. ``model.weights`` loads a ``.safetensors`` / ``.pt`` state dict
(strictly: missing, unexpected or mis-shaped keys are an error).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

MODELS = ("mlp", "cnn", "vit_tiny")
_NOT_KWARGS = ("name", "target_modules", "weights")


class ModelConfigError(ValueError):
    """A model setting that cannot work (message names the key, value and what is allowed)."""


class MLP(nn.Sequential):
    """``flatten -> fc1 -> relu -> ... -> head``; layer names ``fc1, fc2, ..., head``."""

    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        dims = [int(input_dim), *(int(h) for h in hidden)]
        layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True), start=1):
            layers[f"fc{i}"] = nn.Linear(d_in, d_out)
            layers[f"act{i}"] = nn.ReLU()
        layers["head"] = nn.Linear(dims[-1], int(num_classes))
        super().__init__(OrderedDict(layers))


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelConfigError(f"model={model} cannot take input shape {tuple(input_shape)}; "
                               "allowed: images (C, H, W) (use model=mlp for flat features)")
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


class CNN(nn.Module):
    """Two 3x3 conv layers (each ReLU + 2x2 max-pool), a dense layer and a head.

    Layer names ``conv1, conv2, fc, head``: the pfl-research / FedAvg-paper style small CNN.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "cnn")
        if h < 4 or w < 4:
            raise ModelConfigError(f"model=cnn cannot take input shape {tuple(input_shape)}; "
                                   "allowed: images at least 4x4 (two 2x2 poolings)")
        c1, c2 = (int(v) for v in channels)
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), int(hidden))
        self.head = nn.Linear(int(hidden), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


class Attention(nn.Module):
    """Multi-head self-attention with ``q, k, v, out`` as ``nn.Linear`` (LoRA targets)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                                       split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLPBlock(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), MLPBlock(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A small vision transformer: conv patch embedding, class token, ``depth`` blocks, head.

    Layer names: ``patch_embed``, ``blocks.<i>.attn.{q,k,v,out}``,
    ``blocks.<i>.mlp.{fc1,fc2}``, ``head``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "vit_tiny")
        p = int(patch_size)
        if p < 1 or h % p or w % p:
            raise ModelConfigError(f"model.patch_size={patch_size} does not divide the input "
                                   f"size {h}x{w}; allowed: a common divisor of {h} and {w}")
        if int(dim) % int(heads):
            raise ModelConfigError(f"model.heads={heads} does not divide model.dim={dim}; "
                                   "allowed: a divisor of dim")
        self.patch_embed = nn.Conv2d(c, int(dim), p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, int(dim)))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (h // p) * (w // p), int(dim)) * 0.02)
        self.blocks = nn.ModuleList(Block(int(dim), int(heads), int(dim * mlp_ratio))
                                    for _ in range(int(depth)))
        self.norm = nn.LayerNorm(int(dim))
        self.head = nn.Linear(int(dim), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def _kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_cfg.items() if k not in _NOT_KWARGS}


def build_model(
    model_cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """A fresh model for ``input_shape`` and ``num_classes`` from the ``model`` config group."""
    if model_cfg.get("_target_"):
        try:
            return instantiate(_kwargs(model_cfg), input_shape=list(input_shape),
                               num_classes=int(num_classes))
        except Exception as err:  # noqa: BLE001 - import errors and the factory's own errors
            raise ModelConfigError(f"model._target_={model_cfg['_target_']!r} failed: "
                                   f"{str(err).splitlines()[0]}") from err
    name = model_cfg.get("name")
    kw = _kwargs(model_cfg)
    if name == "mlp":
        input_dim = 1
        for d in input_shape:
            input_dim *= int(d)
        return MLP(input_dim, kw.get("hidden", [64, 64]), num_classes)
    factories = {"cnn": CNN, "vit_tiny": ViTTiny}
    if name in factories:
        try:
            return factories[name](input_shape, num_classes, **kw)
        except TypeError as err:
            raise ModelConfigError(f"model={name}: {err}") from err
    if name == "custom":
        raise ModelConfigError("model._target_=None is not set; allowed: the dotted path of an "
                               "nn.Module class or factory, e.g. my_models.Net")
    raise ModelConfigError(f"model.name={name!r} is not a model; allowed: {', '.join(MODELS)} "
                           "or a model config with _target_")


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


def check_model_input(model: nn.Module, input_shape: Sequence[int], num_classes: int,
                      name: str) -> None:
    """A dry forward pass on two zero samples; one-line error if the model cannot take them."""
    x = torch.zeros(2, *(int(d) for d in input_shape))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - any shape error from any layer
        raise ModelConfigError(f"model={name} cannot take input shape {tuple(input_shape)}: "
                               f"{str(err).splitlines()[0]}") from err
    if tuple(out.shape) != (2, int(num_classes)):
        raise ModelConfigError(f"model={name} outputs shape {tuple(out.shape)[1:]} per sample; "
                               f"allowed: ({int(num_classes)},) (the dataset's classes)")


def check_model(model: nn.Module, model_cfg: Mapping[str, Any], input_shape: Sequence[int],
                num_classes: int) -> None:
    """Load ``model.weights`` when set and dry-run the input shape (one-line errors)."""
    if model_cfg.get("weights"):
        load_weights(model, model_cfg["weights"])
    check_model_input(model, input_shape, num_classes,
                      str(model_cfg.get("name") or model_cfg.get("_target_")))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (part of the pretraining cache key); "" when it is missing."""
    import hashlib

    p = Path(os.path.expanduser(str(path)))
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
