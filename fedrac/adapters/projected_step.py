"""The projected step of the RAC-LoRA analysis (``client.projected_step``), one-factor methods.

The paper's step on the trained factor is ``Â = −η (BᵀB)⁻¹ Bᵀ ∇f`` (sketch ``B``) or
``B̂ = −η ∇f Aᵀ (AAᵀ)⁻¹`` (sketch ``A``), so ``ΔW = −η s H ∇f`` with ``H`` the orthogonal
projection onto the sketch's span. A plain optimizer step equals it only when the sketch's
Gram matrix is the identity (``orthogonal``, ``coordinate``); :class:`ProjectedStep`
preconditions the trained factor's gradient by the inverse Gram matrix of its frozen sketch,
so ``gaussian`` and ``rademacher`` sketches follow the analysed method too.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectedStep:
    """Pre-step hook: ``∇A ← (BᵀB)⁻¹ ∇A`` or ``∇B ← ∇B (AAᵀ)⁻¹`` for every attached adapter
    with exactly one trained factor (the Gram inverse is computed once: the sketch is frozen)."""

    def __init__(self, model: nn.Module) -> None:
        from fedrac.adapters import attached

        self.items: list[tuple[nn.Parameter, torch.Tensor, str]] = []
        for _, _, module in attached(model):
            a, b = module.lora_A, module.lora_B
            if isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter):
                b64 = b.detach().to(torch.float64)
                self.items.append((a, torch.linalg.inv(b64.T @ b64), "left"))
            elif isinstance(b, nn.Parameter) and not isinstance(a, nn.Parameter):
                a64 = a.detach().to(torch.float64)
                self.items.append((b, torch.linalg.inv(a64 @ a64.T), "right"))

    @torch.no_grad()
    def before_step(self) -> None:
        """Call between ``backward()`` and ``optimizer.step()``."""
        for param, gram_inv, side in self.items:
            if param.grad is None:
                continue
            g = param.grad.to(torch.float64)
            g = gram_inv @ g if side == "left" else g @ gram_inv
            param.grad.copy_(g.to(param.grad.dtype))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing after the step."""
