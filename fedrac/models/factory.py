"""Model factories: ``mlp``, ``cnn``, ``vit_tiny``, ``hf`` (transformers, see
:mod:`fedrac.models.hf`), or any ``nn.Module`` via ``_target_``.

Every factory takes the task's ``input_shape`` (without the batch dimension) and
``num_classes``. ``model.weights`` loads a ``.safetensors`` / ``.pt`` state dict
(strictly: missing, unexpected or mis-shaped keys are an error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from fedrac.models.builtin import CNN, MLP, ViTTiny
from fedrac.models.errors import ModelConfigError
from fedrac.models.weights import load_weights

MODELS = ("mlp", "cnn", "vit_tiny", "hf")
_NOT_KWARGS = ("name", "target_modules", "weights")


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
    if name == "hf":
        from fedrac.models.hf import build_hf_model

        return build_hf_model(model_cfg, num_classes)
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
    if model_cfg.get("name") == "hf":
        from fedrac.models.hf import check_hf_model

        check_hf_model(model, model_cfg)
        return
    if model_cfg.get("weights"):
        load_weights(model, model_cfg["weights"])
    check_model_input(model, input_shape, num_classes,
                      str(model_cfg.get("name") or model_cfg.get("_target_")))
