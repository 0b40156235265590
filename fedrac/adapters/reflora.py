"""RefLoRA (Zhang, Li & Giannakis, arXiv 2505.18877): refactor both LoRA factors each step.

``B A`` has many factorizations ``(B P^{-T}, P^T A)``; RefLoRA picks, every step, the one that
minimises an upper bound of the loss, which is the *balanced* one, ``A Aᵀ = Bᵀ B``. With
``A Aᵀ = V_A Σ_A² V_Aᵀ`` and ``M = B V_A Σ_A``, ``Mᵀ M = V_M Σ_M² V_Mᵀ``:
``P = V_A Σ_A⁻¹ V_M Σ_M^{1/2}`` gives ``A' = Pᵀ A``, ``B' = B P^{-T}``, ``B' A' = B A`` and
``A' A'ᵀ = B'ᵀ B' = Σ_M`` (:func:`balance`). A gradient step taken in the refactored
coordinates equals, in the original ones, the preconditioned step
``∇A ← S⁻¹ ∇A``, ``∇B ← ∇B S`` with ``S = P Pᵀ`` (:func:`preconditioners`); this is how the
official code (``zhangyilang/RefLoRA``) applies it, as an optimizer pre-step hook.
RefLoRA-S (the scalar form) rescales after the step, ``A ← c^{1/2} A``, ``B ← c^{-1/2} B`` with
``c = ‖B‖_F / ‖A‖_F``, and rescales Adam's moments to match (:func:`rescale_scalar`).

:class:`Refactorer` applies either form to the LoRA layers whose two factors both train
(FedIT, COLA, FedEx-LoRA, FLoRA); it skips a layer while a factor is zero (a fresh link
starts at ``B = 0``, where ``S = 0`` would freeze ``B``), and honours ``warmup_steps`` and
``interval`` as the official code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

REFACTORS = ("none", "reflora", "reflora_s")


def _decompose(a: torch.Tensor, b: torch.Tensor, eps: float):
    """``(V_A, σ_A, V_M, σ_M²)`` of the factor pair, in float64 (``σ_A`` floored at ``eps``)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    sa_sq, va = torch.linalg.eigh(a64 @ a64.T)
    sa = torch.sqrt(sa_sq.clamp_min(0.0)).clamp_min(eps)
    m = b64 @ (va * sa)
    sm_sq, vm = torch.linalg.eigh(m.T @ m)
    return va, sa, vm, sm_sq.clamp_min(eps * eps)


def balance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced refactoring ``(Pᵀ A, B P^{-T})`` of ``A: r×d_in``, ``B: d_out×r``: same
    ``B A``, and ``A Aᵀ = Bᵀ B`` (both full rank; ``eps`` floors tiny singular values)."""
    va, sa, vm, sm_sq = _decompose(a, b, eps)
    sm_quarter = sm_sq ** 0.25  # Σ_M^{1/2}
    pt = ((va / sa) @ (vm * sm_quarter)).T
    pt_inv = (va * sa) @ (vm / sm_quarter)
    return (pt @ a.to(torch.float64)).to(a.dtype), (b.to(torch.float64) @ pt_inv).to(b.dtype)


def preconditioners(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁻¹)`` with ``S = P Pᵀ = V_A Σ_A⁻¹ V_M Σ_M V_Mᵀ Σ_A⁻¹ V_Aᵀ`` (float64, ``r×r``)."""
    va, sa, vm, sm_sq = _decompose(a, b, eps)
    sm = torch.sqrt(sm_sq)
    left = (va / sa) @ vm
    inv_left = (va * sa) @ vm
    return (left * sm) @ left.T, (inv_left / sm) @ inv_left.T


@torch.no_grad()
def precondition_grads(a: nn.Parameter, b: nn.Parameter, eps: float = 1e-12) -> None:
    """RefLoRA as a pre-step hook: ``∇A ← S⁻¹ ∇A``, ``∇B ← ∇B S`` (in place)."""
    s, s_inv = preconditioners(a.detach(), b.detach(), eps)
    if a.grad is not None:
        a.grad.copy_((s_inv @ a.grad.to(torch.float64)).to(a.grad.dtype))
    if b.grad is not None:
        b.grad.copy_((b.grad.to(torch.float64) @ s).to(b.grad.dtype))


@torch.no_grad()
def rescale_scalar(a: nn.Parameter, b: nn.Parameter,
                   optimizer: torch.optim.Optimizer | None = None) -> float:
    """RefLoRA-S after a step: ``A ← √c A``, ``B ← B / √c`` with ``c = ‖B‖/‖A‖`` (so both
    get the norm ``√(‖A‖‖B‖)``); Adam's moments follow (the gradient of ``A`` scales by
    ``1/√c``, of ``B`` by ``√c``; ``exp_avg`` by that, ``exp_avg_sq`` by its square), SGD's
    momentum buffer like ``exp_avg``. Returns ``c``."""
    c = float(torch.linalg.norm(b) / torch.linalg.norm(a))
    p = c ** 0.5
    a.mul_(p)
    b.div_(p)
    if optimizer is not None:
        for param, g in ((a, 1.0 / p), (b, p)):
            state = optimizer.state.get(param, {})
            if "exp_avg" in state:
                state["exp_avg"].mul_(g)
            if "exp_avg_sq" in state:
                state["exp_avg_sq"].mul_(g * g)
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"].mul_(g)
    return c


def trained_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(A, B)`` of every attached LoRA adapter whose two factors are both trained."""
    from fedrac.adapters import attached

    pairs = []
    for _, _, module in attached(model):
        a, b = module.lora_A, module.lora_B
        if isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter):
            pairs.append((a, b))
    return pairs


class Refactorer:
    """Applies ``reflora`` (pre-step gradient preconditioning) or ``reflora_s`` (post-step
    rescaling) to ``pairs`` of trained factors: from step ``warmup_steps`` on, every
    ``interval`` steps; a pair with a zero factor is left alone."""

    def __init__(self, pairs: Sequence[tuple[nn.Parameter, nn.Parameter]], mode: str,
                 eps: float = 1e-12, interval: int = 1, warmup_steps: int = 0) -> None:
        if mode not in REFACTORS:
            raise ValueError(f"client.refactor={mode!r} is not allowed; "
                             f"allowed: {', '.join(REFACTORS)}")
        self.pairs, self.mode = list(pairs), mode
        self.eps, self.interval, self.warmup = float(eps), max(1, int(interval)), int(warmup_steps)
        self.step = 0  # optimizer steps taken so far
        self.applied = 0  # refactorings applied (pairs x steps)

    def _active(self) -> bool:
        return self.step >= self.warmup and (self.step - self.warmup) % self.interval == 0

    @staticmethod
    def _live(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.count_nonzero(a)) and bool(torch.count_nonzero(b))

    def before_step(self) -> None:
        """Call between ``backward()`` and ``optimizer.step()``."""
        if self.mode != "reflora" or not self._active():
            return
        for a, b in self.pairs:
            if self._live(a, b):
                precondition_grads(a, b, self.eps)
                self.applied += 1

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call after ``optimizer.step()``."""
        if self.mode == "reflora_s" and self._active():
            for a, b in self.pairs:
                if self._live(a, b):
                    rescale_scalar(a, b, optimizer)
                    self.applied += 1
        self.step += 1
