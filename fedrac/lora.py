"""LoRA adapters as ``torch.nn.utils.parametrize`` parametrizations (minLoRA style).

A target layer's weight ``W`` (``d_out x d_in``; a conv kernel is flattened to
``out x (in*kh*kw)``) is replaced on the fly by ``W + s * B @ A`` with
``B: d_out x r``, ``A: r x d_in`` and ``s = alpha / r``. Each factor is either a
trained ``nn.Parameter`` or a frozen buffer. Merging is
``remove_parametrizations(leave_parametrized=True)``; any module type with a
2-D or conv-shaped ``weight`` works.
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


@dataclass(frozen=True)
class LayerSpec:
    """A target layer: its name, weight shape and flattened ``d_out x d_in``."""

    name: str
    weight_shape: tuple[int, ...]

    @property
    def d_out(self) -> int:
        return int(self.weight_shape[0])

    @property
    def d_in(self) -> int:
        n = 1
        for d in self.weight_shape[1:]:
            n *= int(d)
        return n

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    def factor_shape(self, factor: str, rank: int) -> tuple[int, int]:
        return (rank, self.d_in) if factor == "A" else (self.d_out, rank)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def find_target_layers(
    model: nn.Module, target_modules: Iterable[str] | str
) -> dict[str, LayerSpec]:
    """The layers of ``model`` whose names match ``target_modules`` (PEFT style).

    A pattern matches a module name exactly, as a dotted suffix, or as a glob;
    ``"all"`` selects every Linear/Conv layer. Raises when nothing matches.
    """
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found: dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        if not isinstance(module, ADAPTABLE) or not name:
            continue
        if any(p == "all" or _matches(name, p) for p in patterns):
            found[name] = LayerSpec(name, tuple(module.weight.shape))
    if not found:
        allowed = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
        raise AdapterConfigError(
            f"model.target_modules={patterns} matches no Linear/Conv layer; "
            f"allowed: names or globs over {allowed} or 'all'"
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


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float, weight_shape) -> torch.Tensor:
    """``scale * B @ A`` reshaped to the layer's weight shape."""
    return (scale * (b @ a)).reshape(weight_shape)


class LoRAParametrization(nn.Module):
    """``W -> W + s * B @ A`` with each factor trained (parameter) or frozen (buffer)."""

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, scale: float, trained: str
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        for key, value, train in (("lora_A", a, trained in ("A", "both")),
                                  ("lora_B", b, trained in ("B", "both"))):
            if train:
                self.register_parameter(key, nn.Parameter(value.clone()))
            else:
                self.register_buffer(key, value.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + delta_weight(self.lora_A, self.lora_B, self.scale, weight.shape)


def attach_adapters(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    trained: Mapping[str, str],
) -> None:
    """Wrap each layer's weight with ``W + (alpha/rank) * B @ A``; freeze all else."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        a, b = factors[name]
        device, dtype = module.weight.device, module.weight.dtype
        param = LoRAParametrization(
            a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
            alpha / rank, trained[name],
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
