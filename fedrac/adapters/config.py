"""What an adapter is made of: target layer shapes, ranks, the trained side, factor dtypes.

Math (DESIGN.md §2): a target layer's weight ``W`` (``d_out x d_in``; a conv kernel flattened to
``out x (in*kh*kw)``; transformers' ``Conv1D`` stores it transposed, ``d_in x d_out``) gets the
update ``ΔW = s * B @ A`` with ``B: d_out x r``, ``A: r x d_in`` and ``s = alpha / r``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

TRAIN_FACTORS = ("A", "B", "both", "auto")
FACTOR_DTYPE = torch.float32  # LoRA factors of half-precision or quantised layers, and the default


class AdapterConfigError(ValueError):
    """Raised for adapter settings a model cannot take (message names the key)."""


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


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's LoRA factors live and travel in: the weight's own for float32 and
    float64 layers, :data:`FACTOR_DTYPE` for half-precision (bf16/fp16) or quantised bases."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else FACTOR_DTYPE
