"""Stop a run whose global model blew up: a non-finite round, or a round that moved the
weights an order of magnitude more than any round before it (issue: a client scaling its
update by 1e20 under ``aggregation=mean`` used to end with ``status: ok``)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

FACTOR = 10.0  # a round may move the weights at most this many times the largest move so far
CHUNK = 1 << 21  # elements per float64 piece: a 16 MiB transient however large the tensor


class RunDiverged(Exception):  # noqa: N818 - the run's result, reported as status failed
    """Round ``server_round`` made the global model unusable (``reason``: one line)."""

    def __init__(self, server_round: int, reason: str) -> None:
        super().__init__(f"round {server_round} diverged: {reason}")
        self.server_round, self.reason = server_round, reason


def _pieces(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t``'s elements, flat, at most :data:`CHUNK` at a time (split along the first
    dimension, so two tensors of one shape give aligned pieces; a piece is a copy only
    when its slice is not contiguous)."""
    if t.numel() <= CHUNK:
        yield t.reshape(-1)
    elif t.dim() == 1:
        for i in range(0, t.numel(), CHUNK):
            yield t[i:i + CHUNK].reshape(-1)
    else:
        for part in t.split(max(1, CHUNK // t[0].numel())):
            yield from _pieces(part if part.numel() <= CHUNK else part[0])  # one long row


def _finite(t: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in _pieces(t))


def _norm(tensors: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor] | None = None
          ) -> float:
    """The float64 norm of ``tensors`` (minus ``minus``), one :data:`CHUNK` at a time."""
    total = 0.0
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        other = _pieces(minus[key].detach()) if minus is not None else None
        for piece in _pieces(t.detach()):
            u = piece.to(torch.float64)
            if other is not None:
                u = u - next(other).to(torch.float64)
            total += float(torch.linalg.vector_norm(u)) ** 2
    return math.sqrt(total) if math.isfinite(total) else math.inf


class DivergenceGuard:
    """Watches the global weights after each round.

    Round ``t`` diverged when its weights are not finite, or when ``||W_t - W_{t-1}||``
    exceeds :data:`FACTOR` times the largest move of an earlier round (in the first round
    that moved: :data:`FACTOR` times ``||W_0||``, the pretrained weights' own norm).

    The weights are held by reference, not copied: the server hands it read-only views of
    its records (a record's bytes are immutable), so a copy would only add a model to memory.
    """

    def __init__(self, initial: Mapping[str, torch.Tensor]) -> None:
        self.previous = dict(initial)
        self.scale = _norm(initial)
        self.largest = 0.0

    def observe(self, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
        """Check round ``server_round``'s weights; raise :class:`RunDiverged` if it blew up."""
        bad = [k for k, v in state.items() if v.is_floating_point() and not _finite(v.detach())]
        if bad:
            raise RunDiverged(server_round, f"the global weights are not finite ({bad[0]})")
        moved = _norm(state, self.previous)
        bound = FACTOR * (self.largest if self.largest > 0 else self.scale)
        if bound > 0 and moved > bound:
            raise RunDiverged(server_round, f"the global weights moved by {moved:.3g}, over "
                              f"{FACTOR:g}x the largest earlier move ({bound / FACTOR:.3g}"
                              f"{'' if self.largest > 0 else ': the initial weights norm'})")
        self.largest = max(self.largest, moved)
        self.previous = dict(state)

    def state_dict(self) -> dict[str, float]:
        """The largest move so far (the previous weights are the checkpoint's own)."""
        return {"largest": self.largest, "scale": self.scale}

    def load_state_dict(self, state: Mapping[str, float],
                        weights: Mapping[str, torch.Tensor]) -> None:
        """Continue after a resume from the weights of the checkpointed round."""
        self.largest, self.scale = float(state["largest"]), float(state["scale"])
        self.previous = dict(weights)
