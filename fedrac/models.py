"""Model factories: the bundled MLP, or any ``nn.Module`` through Hydra's ``_target_``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import instantiate
from torch import nn

MODELS = ("mlp",)


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


def build_model(
    model_cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """A fresh model for ``input_shape`` and ``num_classes`` from the ``model`` config group."""
    if "_target_" in model_cfg:
        kwargs = {k: v for k, v in model_cfg.items() if k not in ("name", "target_modules")}
        return instantiate(kwargs, input_shape=list(input_shape), num_classes=int(num_classes))
    name = model_cfg.get("name")
    if name == "mlp":
        input_dim = 1
        for d in input_shape:
            input_dim *= int(d)
        return MLP(input_dim, model_cfg.get("hidden", [64, 64]), num_classes)
    raise ValueError(f"model.name={name!r} is not a model; allowed: {', '.join(MODELS)} "
                     "or a model config with _target_")
