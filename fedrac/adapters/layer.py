"""The adapter of one layer: LoRA on the forward path (PEFT's ``lora.Linear`` semantics).

A target layer computes ``base(x) + s * ((x Aᵀ) Bᵀ)``: the base weight is never rebuilt with the
delta, its gradient is never formed, and it may be quantised (bitsandbytes' ``Linear4bit`` /
``Linear8bitLt``). A conv layer runs ``A`` as a conv with the base's kernel, stride, padding and
dilation and ``B`` as a 1x1 conv (PEFT's ``lora.Conv2d``); a grouped conv adds the conv of the
delta kernel instead. Each factor is a trained ``nn.Parameter`` or a frozen buffer (the sketch),
in :func:`~fedrac.adapters.config.adapter_dtype` of the base; the low-rank path runs in that
dtype and its output is cast to the base output's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedrac.adapters.config import delta_weight

ADAPTER_ATTR = "lora_adapter"  # the child module an adapted layer holds while adapted
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAAdapter(nn.Module):
    """``s * ((x Aᵀ) Bᵀ)`` (``scale * B @ A`` applied to ``x`` factor by factor) for one layer.

    ``trained``: ``A``, ``B``, ``both`` or ``R`` are ``nn.Parameter``; the others are buffers.
    ``middle``: an optional ``r x r`` factor ``R`` between them (LoRA-SB / Fed-SB): the path
    is then ``s * B @ R @ A`` (``R`` trained when ``trained == "R"``).
    ``conv_dims``: 0 for linear layers (``nn.Linear``, its quantised kinds and ``Conv1D``),
    else the conv's spatial dimensions.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, trained: str,
                 weight_shape: tuple[int, ...], transposed: bool = False,
                 conv_dims: int = 0, groups: int = 1,
                 middle: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scale = float(scale)
        self.transposed = bool(transposed)
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.conv_dims, self.groups = int(conv_dims), int(groups)
        for key, value, train in (("lora_A", a, trained in ("A", "both")),
                                  ("lora_B", b, trained in ("B", "both"))):
            if train:
                self.register_parameter(key, nn.Parameter(value.clone()))
            else:
                self.register_buffer(key, value.clone())
        if middle is None:
            self.lora_R: torch.Tensor | None = None
        else:
            if trained == "R":
                self.lora_R = nn.Parameter(middle.clone())
            else:
                self.register_buffer("lora_R", middle.clone())

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` (``scale * B @ R @ A`` with a middle factor) laid out like the
        base weight."""
        return delta_weight(self.down(), self.lora_B, self.scale, self.weight_shape,
                            self.transposed)

    def down(self) -> torch.Tensor:
        """The ``r x d_in`` map the path starts with: ``A``, or ``R @ A`` with a middle
        factor (``R`` is ``r x r``: the product costs little beside the batch's)."""
        return self.lora_A if self.lora_R is None else self.lora_R @ self.lora_A

    def path(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The low-rank path's output for input ``x`` of ``base``."""
        a, b = self.down(), self.lora_B
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        if not self.conv_dims:
            return F.linear(F.linear(x, a), b) * self.scale
        if self.groups != 1:  # a grouped conv: the delta kernel itself (small for conv layers)
            return base._conv_forward(x, self.delta().to(x.dtype), None)
        h = base._conv_forward(x, a.reshape(a.shape[0], *self.weight_shape[1:]), None)
        return _CONV[self.conv_dims](h, b.reshape(*b.shape, *([1] * self.conv_dims))) \
            * self.scale


def add_adapter_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted layer: its output plus its adapter's low-rank path."""
    adapter: LoRAAdapter = getattr(module, ADAPTER_ATTR)
    y = adapter.path(module, args[0])
    return output + (y if y.dtype == output.dtype else y.to(output.dtype))
