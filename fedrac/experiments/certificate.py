"""The optimality certificate of Kim, Kim & Ryu (arXiv 2502.09376) where the gradient is exact.

LoRA with ``W = W0 + s B A`` and coupled weight decay ``lambda`` on both factors minimises
``L(W0 + s B A) + lambda/2 (||A||^2 + ||B||^2)``, whose minimum over the factorisations of
``X = s B A`` is the convex problem ``min_X L(W0 + X) + (lambda / s) ||X||_*``. A stationary
point of the factored problem is a global minimum of the convex one iff
``||grad L(W0 + X)||_2 <= lambda / s`` (the certificate). Because a chain method (RAC-LoRA,
COLA, FLoRA) decays only the round's increment, its fixed points need not be stationary for
the penalised problem; the proximal residual ``||X - SVT(X - eta grad, eta lambda / s)||_F``
(zero exactly at the convex problem's minimum) says whether they are.

"Fails loudly": the certificate fails while the layer is at full adapter rank ``r`` and its
update is large (``||X||_F >= loud_factor * ||X_ref||_F``, ``X_ref`` the reference minimum
from proximal gradient with singular-value thresholding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


def svt(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular-value thresholding: the prox of ``tau ||.||_*`` at ``x``."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u * (s - tau).clamp(min=0.0)) @ vh


def reference_minimum(grad: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int],
                      lip: float, tau: float, iters: int = 20000, tol: float = 1e-13
                      ) -> torch.Tensor:
    """``argmin_X L(W0 + X) + tau ||X||_*`` by proximal gradient (step ``1/lip``) from zero;
    ``grad(X)`` is ``grad L(W0 + X)``."""
    x = torch.zeros(shape, dtype=torch.float64)
    step = 1.0 / lip
    for _ in range(iters):
        nxt = svt(x - step * grad(x), step * tau)
        if float(torch.linalg.norm(nxt - x)) <= tol * max(1.0, float(torch.linalg.norm(x))):
            return nxt
        x = nxt
    return x


@dataclass(frozen=True)
class Certificate:
    """One layer's optimality check at one point."""

    grad_norm: float       # ||grad L(W0 + X)||_2 (spectral)
    threshold: float       # lambda / s
    ratio: float           # grad_norm / threshold (inf when lambda = 0 and grad != 0)
    prox_residual: float   # ||X - SVT(X - grad / lip, lambda / (s lip))||_F / ||X_ref||_F
    holds: bool            # ratio <= 1 + tol and prox_residual <= tol
    rank: int
    frobenius_norm: float
    ref_rank: int
    ref_frobenius_norm: float
    ref_distance: float    # ||X - X_ref||_F / ||X_ref||_F
    fails_loudly: bool

    def as_dict(self) -> dict:
        return asdict(self)


def certify(x: torch.Tensor, g: torch.Tensor, x_ref: torch.Tensor, lam: float, scale: float,
            lip: float, adapter_rank: int, rank_tol: float = 1e-3, tol: float = 1e-3,
            loud_factor: float = 1.0) -> Certificate:
    """The certificate of the update ``x`` with gradient ``g`` against the reference ``x_ref``
    (``lam``: the coupled weight decay, ``scale``: ``s = alpha / r``)."""
    threshold = lam / scale
    grad_norm = float(torch.linalg.matrix_norm(g, ord=2))
    ratio = grad_norm / threshold if threshold > 0 else (0.0 if grad_norm == 0 else float("inf"))
    ref_norm = float(torch.linalg.norm(x_ref))
    denom = ref_norm if ref_norm > 0 else 1.0
    resid = float(torch.linalg.norm(x - svt(x - g / lip, threshold / lip))) / denom
    s = torch.linalg.svdvals(x)
    rank = int((s > rank_tol * s[0]).sum()) if float(s[0]) > 0 else 0
    sr = torch.linalg.svdvals(x_ref)
    ref_rank = int((sr > rank_tol * sr[0]).sum()) if float(sr[0]) > 0 else 0
    fro = float(torch.linalg.norm(x))
    holds = ratio <= 1.0 + tol and resid <= tol
    loud = (not holds) and rank >= adapter_rank and fro >= loud_factor * ref_norm
    return Certificate(grad_norm, threshold, ratio, resid, holds, rank, fro, ref_rank, ref_norm,
                       float(torch.linalg.norm(x - x_ref)) / denom, loud)
