"""FedEx-LoRA: FedIT plus the dense residual that makes the global update exact."""

from __future__ import annotations

import torch

from strategies.base import ValidReply
from strategies.two_factor import TwoFactorLoRA, lora_product


class FedExLoRA(TwoFactorLoRA):
    """FedIT's separate averages plus the residual folded into the frozen weights.

    Rule: ``A <- mean(A_k)``, ``B <- mean(B_k)`` and
    ``W0 <- W0 + s * (sum_k p_k B_k A_k - B @ A)``, so ``W0 + s * B @ A`` moves by
    exactly ``sum_k p_k s B_k A_k``. The residual is dense (``d_out * d_in`` per layer):
    it is sent next round as the ``update`` record (kind ``residual``) on top of the
    previous base weights. Config keys as FedIT. Under a robust ``aggregation`` rule the
    factors are ``rule(A_k)``, ``rule(B_k)`` and the residual makes the model move by exactly
    the rule applied to the clients' dense products ``s B_k A_k`` (coordinate-wise for
    ``median`` / ``trimmed_mean``). Under ``privacy=dp`` a client's update is its two factor
    updates *and* its dense product update ``s B_k A_k - s B A``, clipped together: the
    residual is a non-linear function of the individual factors, so the server can only form
    it from a privatised mean of the products (dense noise, as FPFT's).
    """

    name = "fedex_lora"
    update_kind = "residual"

    def combine(self, server_round: int, valid: list[ValidReply]) -> None:
        """Average the factors and fold the residual into the base weights."""
        if self.dp is not None:
            exact = self.private_combine(server_round, valid)
        else:
            self.adapters = self.average(server_round, valid, self.round_start)
            weights = [r.weight for r in valid]
            exact = {}
            for name, spec in self.layers.items():  # one layer's dense products at a time
                products = [{name: lora_product(r.tensors[f"{name}.lora_A"],
                                                r.tensors[f"{name}.lora_B"], self.scale, spec)}
                            for r in valid]
                exact[name] = self.aggregator.aggregate(server_round, products, weights)[name]
        residual = {}
        for name, spec in self.layers.items():
            residual[name] = exact[name] - lora_product(self.adapters[f"{name}.lora_A"],
                                                        self.adapters[f"{name}.lora_B"],
                                                        self.scale, spec)
        terms = None if self.dp is not None or not self.aggregator.rule.linear else \
            self.residual_terms(valid)
        self.merge_into_base(residual, as_update=True, terms=terms)
        self.update = {self.layers[n].weight_key: r.to(torch.float32)
                       for n, r in residual.items()}

    def residual_terms(self, valid: list[ValidReply]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The residual of a linear rule as stacked factors: ``[s c_1 B_1, ..., s c_K B_K,
        -s B]`` beside ``[A_1; ...; A_K; A]`` (rank ``(K + 1) r``)."""
        assert self.adapters is not None
        c = self.aggregator.coefficients([r.weight for r in valid]).tolist()
        terms = {}
        for name in self.layers:
            b = torch.cat([r.tensors[f"{name}.lora_B"].to(torch.float64) * (self.scale * ck)
                           for r, ck in zip(valid, c, strict=True)]
                          + [self.adapters[f"{name}.lora_B"].to(torch.float64) * -self.scale],
                          dim=1)
            a = torch.cat([r.tensors[f"{name}.lora_A"].to(torch.float64) for r in valid]
                          + [self.adapters[f"{name}.lora_A"].to(torch.float64)], dim=0)
            terms[name] = (b, a)
        return terms

    def private_combine(self, server_round: int, valid: list[ValidReply]
                        ) -> dict[str, torch.Tensor]:
        """Central DP: one private mean of (factors, dense products); returns the products."""
        def with_products(factors):
            return {**factors, **{f"{n}.product": lora_product(
                factors[f"{n}.lora_A"], factors[f"{n}.lora_B"], self.scale, spec)
                for n, spec in self.layers.items()}}

        assert self.round_start is not None
        self.note_release(server_round, valid)
        agg = self.private_average(server_round, [with_products(r.tensors) for r in valid],
                                   with_products(self.round_start),
                                   modules=[r.modules for r in valid])
        self.adapters = {k: agg[k].to(torch.float32) for k in self.factor_keys()}
        return {n: agg[f"{n}.product"] for n in self.layers}
