"""LoRA adapters as ``torch.nn.utils.parametrize`` parametrizations (minLoRA style).

A target layer's weight ``W`` (``d_out x d_in``; a conv kernel is flattened to
``out x (in*kh*kw)``) is replaced on the fly by ``W + s * B @ A`` with
``B: d_out x r``, ``A: r x d_in`` and ``s = alpha / r``. Each factor is either a
trained ``nn.Parameter`` or a frozen buffer, in the weight's dtype for float32 / float64
layers and float32 for a frozen base in bfloat16 or float16 (which gets the delta cast to
its dtype in the forward pass; :func:`adapter_dtype`). Merging is
``remove_parametrizations(leave_parametrized=True)``; any module type with a
2-D or conv-shaped ``weight`` works, and ``transformers``' ``Conv1D`` (GPT-2), whose
weight is stored transposed (``d_in x d_out``), gets ``(s * B @ A).T``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRAIN_FACTORS = ("A", "B", "both", "auto")


class AdapterConfigError(ValueError):
    """Raised for adapter settings a model cannot take (message names the key)."""


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (weight ``d_in x d_out``).

    Duck-typed (class name and ``nf``), so fedrac never imports transformers for it.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_adaptable(module: nn.Module) -> bool:
    """Linear, Conv1d/2d/3d, or transformers' ``Conv1D``."""
    return isinstance(module, ADAPTABLE) or is_transposed(module)


@dataclass(frozen=True)
class LayerSpec:
    """A target layer: its name, weight shape and flattened ``d_out x d_in``.

    ``transposed``: the weight is stored ``d_in x d_out`` (transformers' ``Conv1D``).
    """

    name: str
    weight_shape: tuple[int, ...]
    transposed: bool = False

    @property
    def d_out(self) -> int:
        return int(self.weight_shape[1 if self.transposed else 0])

    @property
    def d_in(self) -> int:
        if self.transposed:
            return int(self.weight_shape[0])
        n = 1
        for d in self.weight_shape[1:]:
            n *= int(d)
        return n

    def delta(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * B @ A`` laid out like this layer's weight."""
        return delta_weight(a, b, scale, self.weight_shape, self.transposed)

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    def factor_shape(self, factor: str, rank: int) -> tuple[int, int]:
        return (rank, self.d_in) if factor == "A" else (self.d_out, rank)


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
        if not name or not is_adaptable(module):
            continue
        if any(p == "all" or _matches(name, p) for p in patterns):
            found[name] = LayerSpec(name, tuple(module.weight.shape), is_transposed(module))
    if not found:
        raise AdapterConfigError(
            f"model.target_modules={patterns} matches no Linear/Conv layer; "
            f"allowed: names or globs over {layer_names(model)} or 'all'"
        )
    return found


def check_rank(layers: Mapping[str, LayerSpec], rank: int) -> None:
    """Raise unless ``0 < rank <= min(d_out, d_in)`` for every layer."""
    if int(rank) <= 0:
        raise AdapterConfigError(f"strategy.rank={rank} must be a positive integer")
    for spec in layers.values():
        limit = min(spec.d_out, spec.d_in)
        if rank > limit:
            raise AdapterConfigError(
                f"strategy.rank={rank} is larger than layer '{spec.name}' "
                f"({spec.d_in}->{spec.d_out}) allows; allowed: 1..{limit} "
                "(or exclude the layer from model.target_modules)"
            )


def resolve_trained(spec: LayerSpec, train_factor: str) -> str:
    """``A``, ``B`` or ``both`` for one layer; ``auto`` trains the factor with fewer entries."""
    if train_factor not in TRAIN_FACTORS:
        raise AdapterConfigError(
            f"strategy.train_factor={train_factor!r} is not allowed; "
            f"allowed: {', '.join(TRAIN_FACTORS)}"
        )
    if train_factor == "auto":
        return "A" if spec.d_in < spec.d_out else "B"
    return train_factor


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float, weight_shape,
                 transposed: bool = False) -> torch.Tensor:
    """``scale * B @ A`` reshaped to the layer's weight shape (transposed for ``Conv1D``)."""
    if transposed:
        return (scale * (b @ a)).T
    return (scale * (b @ a)).reshape(weight_shape)


FACTOR_DTYPE = torch.float32  # LoRA factors of half-precision layers, and the default


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's LoRA factors live and travel in: the weight's own for float32 and
    float64 layers, :data:`FACTOR_DTYPE` for half-precision (bf16/fp16) frozen bases."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else FACTOR_DTYPE


class LoRAParametrization(nn.Module):
    """``W -> W + s * B @ A`` with each factor trained (parameter) or frozen (buffer)."""

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, scale: float, trained: str,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        self.transposed = bool(transposed)
        for key, value, train in (("lora_A", a, trained in ("A", "both")),
                                  ("lora_B", b, trained in ("B", "both"))):
            if train:
                self.register_parameter(key, nn.Parameter(value.clone()))
            else:
                self.register_buffer(key, value.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = delta_weight(self.lora_A, self.lora_B, self.scale, weight.shape, self.transposed)
        return weight + (delta if delta.dtype == weight.dtype else delta.to(weight.dtype))


def attach_adapters(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    trained: Mapping[str, str],
) -> None:
    """Wrap each layer's weight with ``W + (alpha/rank) * B @ A``; freeze all else.

    The factors are in :func:`adapter_dtype` of the base weight's dtype.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        a, b = factors[name]
        device, dtype = module.weight.device, adapter_dtype(module.weight.dtype)
        param = LoRAParametrization(
            a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
            alpha / rank, trained[name], layers[name].transposed,
        )
        parametrize.register_parametrization(module, "weight", param)


def adapter_factors(model: nn.Module, trained_only: bool = True) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` of the attached adapters (CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        for p in module.parametrizations.weight:
            if not isinstance(p, LoRAParametrization):
                continue
            for key in ("lora_A", "lora_B"):
                t = getattr(p, key)
                if trained_only and not isinstance(t, nn.Parameter):
                    continue
                out[f"{name}.{key}"] = t.detach().to("cpu").clone()
    return out


def _remove(model: nn.Module, merge: bool) -> None:
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=merge)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight and remove it."""
    _remove(model, merge=True)


def remove_adapters(model: nn.Module) -> None:
    """Drop every adapter, leaving the base weights unchanged."""
    _remove(model, merge=False)
