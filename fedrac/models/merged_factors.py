"""The run's merges in low-rank form: per layer stacked factors whose product is ``W - W0``.

Every adapter method merges low-rank terms (a RAC-LoRA round ``s B_bar A_t``, a COLA link, a
FLoRA stack, a FedEx-LoRA residual ``sum_k p_k s B_k A_k - s B A``). :class:`MergedFactors`
keeps them stacked per layer, ``B`` (``d_out x k``) beside ``A`` (``k x d_in``) in the layer's
logical ``d_out x d_in`` layout, so that ``B @ A`` is the sum of the merges. When a stack's
rank ``k`` would exceed what is cheaper than the dense matrix (``k (d_out + d_in) >
d_out d_in``) it is compressed exactly: QR of both stacks and an SVD of the small ``k x k``
core (:func:`low_rank_svd`), keeping the directions above :data:`RANK_TOL`.
The export (:mod:`fedrac.models.export`) takes the same small SVD to write ``adapter/``.
A merge that is not low-rank (a dense private mean under ``privacy=dp``, a coordinate-wise
robust rule) marks the record unusable; the export then falls back to the dense SVD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedrac.adapters import LayerSpec

RANK_TOL = 1e-6  # numerical rank: singular values above RANK_TOL * the largest
STORE_DTYPE = torch.float32  # the stacks as kept; every product and factorisation in float64


def low_rank_svd(b: torch.Tensor, a: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` with ``b @ a = U diag(S) Vh`` (thin, float64), from QR of ``b`` and
    ``aᵀ`` and the SVD of the small core; no ``d_out x d_in`` matrix is formed."""
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def numerical_rank(s: torch.Tensor, tol: float = RANK_TOL) -> int:
    """How many of the descending singular values ``s`` exceed ``tol * s[0]``."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > tol * s[0]).sum())


class MergedFactors:
    """Per target layer the stacked factors of every merge of the run (see the module)."""

    def __init__(self, layers: Mapping[str, LayerSpec]) -> None:
        self.layers = dict(layers)
        self.b: dict[str, torch.Tensor] = {}
        self.a: dict[str, torch.Tensor] = {}
        self.compact: dict[str, int] = {}  # rank after the layer's last compression
        self.broken: str | None = None  # why the record no longer equals the merges

    @property
    def usable(self) -> bool:
        """Whether ``B @ A`` per layer is the sum of every merge so far."""
        return self.broken is None

    def invalidate(self, reason: str) -> None:
        """A merge that has no low-rank form: drop the stacks (the export goes dense)."""
        self.broken = self.broken or reason
        self.b.clear()
        self.a.clear()

    def add(self, name: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """Record the merge ``b @ a`` (``d_out x r`` and ``r x d_in``, any scale folded in)."""
        if not self.usable:
            return
        spec = self.layers[name]
        b = b.detach().reshape(spec.d_out, -1).to(STORE_DTYPE)
        a = a.detach().reshape(-1, spec.d_in).to(STORE_DTYPE)
        if name in self.b:
            b, a = torch.cat([self.b[name], b], dim=1), torch.cat([self.a[name], a], dim=0)
        self.b[name], self.a[name] = b, a
        budget = spec.d_out * spec.d_in // (spec.d_out + spec.d_in)
        if b.shape[1] > max(budget, 2 * self.compact.get(name, 0)):
            self.compress(name)

    def add_all(self, terms: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """:meth:`add` for every layer of ``terms`` (name -> ``(b, a)``)."""
        for name, (b, a) in terms.items():
            self.add(name, b, a)

    def compress(self, name: str) -> None:
        """Replace a layer's stack by its exact thin form (rank = its numerical rank)."""
        u, s, vh = low_rank_svd(self.b[name], self.a[name])
        k = numerical_rank(s)
        self.b[name] = (u[:, :k] * s[:k]).to(STORE_DTYPE)
        self.a[name] = vh[:k].to(STORE_DTYPE)
        self.compact[name] = k

    def rank(self, name: str) -> int:
        """The stacked (not yet numerical) rank of a layer's record."""
        return int(self.b[name].shape[1]) if name in self.b else 0

    def stacks(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of a layer (``d_out x 0`` and ``0 x d_in`` when nothing was merged)."""
        spec = self.layers[name]
        if name not in self.b:
            return torch.zeros(spec.d_out, 0), torch.zeros(0, spec.d_in)
        return self.b[name], self.a[name]

    def plus(self, terms: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> MergedFactors:
        """A copy with ``terms`` added (e.g. the two-factor methods' live adapters)."""
        out = MergedFactors(self.layers)
        out.broken, out.compact = self.broken, dict(self.compact)
        out.b, out.a = dict(self.b), dict(self.a)
        out.add_all(terms)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON values for a checkpoint."""
        return {"b": dict(self.b), "a": dict(self.a), "compact": dict(self.compact),
                "broken": self.broken}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`state_dict`; ``None`` (a checkpoint from before the record):
        unusable, so the export goes dense."""
        if state is None:
            self.invalidate("the checkpoint holds no record of the merged factors")
            return
        self.b, self.a = dict(state["b"]), dict(state["a"])
        self.compact = {k: int(v) for k, v in state["compact"].items()}
        self.broken = state["broken"]
