"""RefLoRA's matrix-factorization toy (the setting of its Figure 2): ``min ½‖B A − Y‖²_F``.

``Y`` (``d × d``) has rank ``r`` and condition number ``condition``; the factors start as LoRA
does (``A`` Gaussian, ``B = 0``) and take plain gradient steps of size ``lr`` with
:class:`fedrac.adapters.reflora.Refactorer` (``none``, ``reflora``, ``reflora_s``). Used by the
tests and ``python -m fedrac.experiments.reflora_toy`` (prints steps to a target loss per form).
"""

from __future__ import annotations

import torch
from torch import nn

from fedrac.adapters.reflora import REFACTORS, Refactorer


def make_target(d: int = 32, rank: int = 4, condition: float = 10.0, seed: int = 0
                ) -> torch.Tensor:
    """A ``d × d`` float64 matrix of rank ``rank``, singular values from 1 to ``condition``."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, float(torch.log10(torch.tensor(condition))), rank,
                           dtype=torch.float64)
    return (u * sigma) @ v.T


def factorize(target: torch.Tensor, rank: int, refactor: str = "none", lr: float = 0.02,
              steps: int = 2000, optimizer: str = "sgd", seed: int = 1) -> list[float]:
    """The loss ``½‖B A − Y‖²`` after every step (float64) of LoRA with ``refactor``."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = target.shape
    a = nn.Parameter(torch.randn(rank, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5)
    b = nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float64))
    opt = (torch.optim.SGD([a, b], lr=lr) if optimizer == "sgd"
           else torch.optim.Adam([a, b], lr=lr))
    hooks = None if refactor == "none" else Refactorer([(a, b)], refactor)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((b @ a - target) ** 2).sum()
        loss.backward()
        if hooks is not None:
            hooks.before_step()
        opt.step()
        if hooks is not None:
            hooks.after_step(opt)
        losses.append(float(0.5 * ((b @ a - target) ** 2).sum().detach()))
    return losses


def steps_to(losses: list[float], target: float) -> int | None:
    """The first step (1-based) whose loss is at most ``target`` (``None``: never)."""
    return next((i + 1 for i, v in enumerate(losses) if v <= target), None)


def main() -> None:
    """Print steps to a loss of 1e-6 relative to ``½‖Y‖²`` for each form and step size."""
    y = make_target()
    goal = 1e-6 * 0.5 * float((y ** 2).sum())
    for lr in (0.005, 0.01, 0.02):
        row = {mode: steps_to(factorize(y, 4, mode, lr=lr, steps=4000), goal)
               for mode in REFACTORS}
        print(f"lr={lr}: steps to 1e-6 relative loss: {row}")


if __name__ == "__main__":
    main()
