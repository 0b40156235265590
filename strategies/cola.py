"""Federated Chain of LoRA (COLA): FedIT whose adapters are merged and restarted periodically."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedrac.adapters import LayerSpec
from strategies.base import ValidReply
from strategies.two_factor import TwoFactorLoRA


class Cola(TwoFactorLoRA):
    """Both factors trained and averaged separately; every ``merge_every`` rounds the
    product ``s * B_bar @ A_bar`` is folded into the weights and the adapters restart
    (zero factor at zero, the other drawn afresh from the round's seed).

    Rule per round: ``A <- sum_k p_k A_k``, ``B <- sum_k p_k B_k``; on a merge round ``W <- W +
    (s B) @ A`` (the stacked factors ``s B``, ``A`` in the adapters' dtype, which is what a
    node that holds the base receives) and the chain restarts. Inexact like FedIT within a
    link.
    Config keys: ``rank``, ``alpha``, ``sketch``, ``train_factor`` (as FedIT) and
    ``merge_every`` (rounds per link of the chain, >= 1).
    """

    name = "cola"

    def __init__(self, *, layers: Mapping[str, LayerSpec], merge_every: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(layers=layers, **kwargs)
        self.merge_every = self.check_merge_every(merge_every)

    @staticmethod
    def check_merge_every(value: Any) -> int:
        """``value`` as an int >= 1, else a one-line ValueError naming the key."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"strategy.merge_every={value!r} is not allowed; "
                             "allowed: an integer >= 1")
        return value

    @classmethod
    def validate_config(cls, strategy_cfg: Mapping[str, Any]) -> None:
        """Check the keys only COLA has."""
        cls.check_merge_every(strategy_cfg.get("merge_every"))

    @classmethod
    def extra_kwargs(cls, strategy_cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {"merge_every": strategy_cfg.get("merge_every", 1)}

    def combine(self, server_round: int, valid: list[ValidReply]) -> None:
        """Average the factors; on a merge round fold them into the weights and restart."""
        self.adapters = self.average(server_round, valid, self.round_start)
        if server_round % self.merge_every == 0:  # the product as stacked factors (rank r)
            merge = {}
            for name in self.layers:
                b = self.adapters[f"{name}.lora_B"].to(torch.float64) * self.scale
                merge[f"{name}.stack_B"] = b.to(self.adapters[f"{name}.lora_B"].dtype)
                merge[f"{name}.stack_A"] = self.adapters[f"{name}.lora_A"]
            self.merge_into_base(merge, as_update=False)
            self.adapters = None
