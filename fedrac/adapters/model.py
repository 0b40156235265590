"""Adapters on a whole model: find the target layers, attach, read, merge and remove adapters.

Attaching gives each target layer an :class:`~fedrac.adapters.layer.LoRAAdapter` child and a
forward hook that adds its low-rank path to the layer's output; the layer itself (and so the
model's ``state_dict`` keys of its weight and bias) is left as it was. Merging folds
``s * B @ A`` into the base weight (the server's merge and the export; never a training step).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from fedrac.adapters.config import AdapterConfigError, LayerSpec, adapter_dtype
from fedrac.adapters.layer import ADAPTER_ATTR, LoRAAdapter, add_adapter_output

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HOOK_ATTR = "_lora_adapter_hook"


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (weight ``d_in x d_out``).

    Duck-typed (class name and ``nf``), so fedrac never imports transformers for it.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_adaptable(module: nn.Module) -> bool:
    """Linear (bitsandbytes' quantised ones too), Conv1d/2d/3d, or transformers' ``Conv1D``."""
    return isinstance(module, ADAPTABLE) or is_transposed(module)


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The layer's logical weight shape (a quantised ``Linear`` stores a packed one)."""
    if isinstance(module, nn.Linear):
        return (int(module.out_features), int(module.in_features))
    return tuple(int(d) for d in module.weight.shape)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def default_target_modules(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for a transformers model's ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise AdapterConfigError("model.target_modules=auto needs a transformers model "
                                 "(model=hf); allowed here: layer names, globs or 'all'")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise AdapterConfigError(
            f"model.target_modules=auto: PEFT has no default for model_type {model_type!r}; "
            f"allowed: names or globs over {layer_names(model)} or 'all'")
    return list(targets)


def layer_names(model: nn.Module) -> list[str]:
    """The adaptable layers' names, shortened to their distinct last parts when many."""
    names = [n for n, m in model.named_modules() if n and is_adaptable(m)]
    if len(names) <= 12:
        return names
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def find_target_layers(
    model: nn.Module, target_modules: Iterable[str] | str
) -> dict[str, LayerSpec]:
    """The layers of ``model`` whose names match ``target_modules`` (PEFT style).

    A pattern matches a module name exactly, as a dotted suffix, or as a glob;
    ``"all"`` selects every Linear/Conv layer; ``"auto"`` takes PEFT's default for the
    transformers model's architecture. Raises when nothing matches.
    """
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if patterns == ["auto"]:
        patterns = default_target_modules(model)
    found: dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        if not name or not is_adaptable(module) or name.endswith("." + ADAPTER_ATTR):
            continue
        if any(p == "all" or _matches(name, p) for p in patterns):
            found[name] = LayerSpec(name, weight_shape(module), is_transposed(module))
    if not found:
        raise AdapterConfigError(
            f"model.target_modules={patterns} matches no Linear/Conv layer; "
            f"allowed: names or globs over {layer_names(model)} or 'all'"
        )
    return found


def _factor_dtype(module: nn.Module) -> torch.dtype:
    weight = module.weight
    return adapter_dtype(weight.dtype if weight.is_floating_point() else torch.uint8)


def attach_adapters(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    trained: Mapping[str, str],
    middles: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Give each layer the low-rank path ``(alpha/rank) * B @ A``; freeze all else.

    ``middles``: an ``r x r`` factor ``R`` per layer (the path is then ``s * B @ R @ A``;
    ``trained[name] == "R"`` trains it). The factors are in
    :func:`~fedrac.adapters.config.adapter_dtype` of the base weight's dtype, on its device.
    A layer that holds an adapter already is refused.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        if hasattr(module, ADAPTER_ATTR):
            raise RuntimeError(f"layer '{name}' holds an adapter already; remove it first")
        a, b = factors[name]
        device, dtype = module.weight.device, _factor_dtype(module)
        middle = None if middles is None else middles[name].to(device=device, dtype=dtype)
        conv_dims = 0 if isinstance(module, nn.Linear) or is_transposed(module) else \
            module.weight.dim() - 2
        adapter = LoRAAdapter(
            a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
            alpha / rank, trained[name], layers[name].weight_shape, layers[name].transposed,
            conv_dims, int(getattr(module, "groups", 1)), middle,
        )
        module.add_module(ADAPTER_ATTR, adapter)
        setattr(module, _HOOK_ATTR, module.register_forward_hook(add_adapter_output))


def attached(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRAAdapter]]:
    """``(layer name, layer, adapter)`` of every adapted layer."""
    for name, module in model.named_modules():
        adapter = module._modules.get(ADAPTER_ATTR) if module._modules else None
        if isinstance(adapter, LoRAAdapter):
            yield name, module, adapter


def adapter_factors(model: nn.Module, trained_only: bool = True) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` (and ``"<layer>.lora_R"`` where a
    middle factor is attached) of the attached adapters (CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, _, adapter in attached(model):
        for key in ("lora_A", "lora_B", "lora_R"):
            t = getattr(adapter, key)
            if t is None or (trained_only and not isinstance(t, nn.Parameter)):
                continue
            out[f"{name}.{key}"] = t.detach().to("cpu").clone()
    return out


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": W + s * B @ A}`` of every adapted layer (copies, for inspection:
    training never forms them)."""
    out = {}
    for name, module, adapter in attached(model):
        delta = adapter.delta()
        out[f"{name}.weight"] = module.weight + delta.to(module.weight.dtype)
    return out


def _detach(module: nn.Module) -> LoRAAdapter:
    getattr(module, _HOOK_ATTR).remove()
    delattr(module, _HOOK_ATTR)
    adapter = module._modules.pop(ADAPTER_ATTR)
    return adapter


@torch.no_grad()
def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (``W += s * B @ A``, in ``W``'s dtype) and
    remove it."""
    for name, module, adapter in list(attached(model)):
        weight = module.weight
        if not weight.is_floating_point():
            raise RuntimeError(f"layer '{name}' has a quantised weight; an adapter cannot be "
                               "merged into it (export it as an adapter instead)")
        delta = adapter.delta()
        weight.copy_(weight + (delta if delta.dtype == weight.dtype else delta.to(weight.dtype)))
        _detach(module)


def remove_adapters(model: nn.Module) -> None:
    """Drop every adapter, leaving the base weights unchanged."""
    for _, module, _ in list(attached(model)):
        _detach(module)
