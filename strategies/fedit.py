"""FedIT: federated LoRA with both factors trained and averaged separately (inexact)."""

from __future__ import annotations

from strategies.base import ValidReply
from strategies.two_factor import TwoFactorLoRA


class FedIT(TwoFactorLoRA):
    """LoRA adapters that persist across rounds; ``A`` and ``B`` are averaged separately.

    Rule: ``A <- sum_k p_k A_k``, ``B <- sum_k p_k B_k``; the model is
    ``W0 + s * B @ A`` with the pretrained ``W0`` frozen. Inexact:
    ``mean(B) @ mean(A) != mean(B @ A)``. Clients receive the global factors
    (``adapters``, ``r * (d_in + d_out)`` numbers per layer; in round 1 only the seed of
    the random factor) and upload both. Config keys: ``rank``, ``alpha``, ``sketch``
    (distribution of the random initial factor), ``train_factor`` (which factor starts
    at zero: ``both`` = ``B``, or ``A`` / ``B``).
    """

    name = "fedit"

    def combine(self, server_round: int, valid: list[ValidReply]) -> None:
        """Average each factor separately; the adapters carry over to the next round."""
        self.adapters = self.average(server_round, valid, self.round_start)
