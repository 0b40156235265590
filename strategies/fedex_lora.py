"""FedEx-LoRA: FedIT plus the dense residual that makes the global update exact."""

from __future__ import annotations

import torch

from strategies.base import ValidReply
from strategies.flora import stack_factors
from strategies.two_factor import TwoFactorLoRA, lora_product


class FedExLoRA(TwoFactorLoRA):
    """FedIT's separate averages plus the residual folded into the frozen weights.

    Rule: ``A <- mean(A_k)``, ``B <- mean(B_k)`` and ``W0 <- W0 + s * (sum_k p_k B_k A_k - B @
    A)``, so ``W0 + s * B @ A`` moves by exactly ``sum_k p_k s B_k A_k``. Under a linear rule
    (``mean``, ``norm_clip``) the residual has rank at most ``(K+1) r``: it is sent as stacked
    factors ``[s p_1 B_1, ..., s p_K B_K, -s B]`` and ``[A_1; ...; A_K; A]`` wherever they are
    smaller than the layer's weight, else dense (``d_out * d_in``); either way as the
    ``update`` record (kind ``residual``) on top of the previous base weights, and the server
    merges the float32 record it sends. Config keys as FedIT. Under a robust ``aggregation``
    rule the factors are ``rule(A_k)``, ``rule(B_k)`` and the residual makes the model move by
    exactly the rule applied to the clients' dense products ``s B_k A_k`` (coordinate-wise for
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
            if self.aggregator.rule.linear:
                self.merge_into_base(self.low_rank_residual(valid), as_update=True,
                                     terms=self.residual_terms(valid))
                return
            weights = [r.weight for r in valid]
            exact = {}
            for name, spec in self.layers.items():  # one layer's dense products at a time
                products = [{name: lora_product(r.tensors[f"{name}.lora_A"],
                                                r.tensors[f"{name}.lora_B"], self.scale, spec)}
                            for r in valid]
                exact[name] = self.aggregator.aggregate(server_round, products, weights)[name]
        self.merge_into_base({spec.weight_key: self.dense_residual(name, exact[name])
                              for name, spec in self.layers.items()}, as_update=True)

    def dense_residual(self, name: str, exact: torch.Tensor) -> torch.Tensor:
        """``exact - s * B @ A`` of layer ``name`` (the global adapters), float32."""
        spec = self.layers[name]
        return (exact - lora_product(self.adapters[f"{name}.lora_A"],
                                     self.adapters[f"{name}.lora_B"], self.scale, spec)
                ).to(torch.float32)

    def low_rank_residual(self, valid: list[ValidReply]) -> dict[str, torch.Tensor]:
        """The residual of a linear rule (``c = coefficients``) per layer, as the stacked
        factors ``[s c_1 B_1, ..., s c_K B_K, -s B]`` and ``[A_1; ...; A_K; A]`` (rank
        ``(K+1) r``) where they are smaller than the layer's weight, else dense."""
        c = self.aggregator.coefficients([r.weight for r in valid]).tolist()
        factors = [r.tensors for r in valid] + [self.adapters]
        coefficients = [self.scale * ck for ck in c] + [-self.scale]
        out: dict[str, torch.Tensor] = {}
        for name, spec in self.layers.items():
            if len(factors) * self.rank * (spec.d_in + spec.d_out) < spec.d_in * spec.d_out:
                out.update(stack_factors({name: spec}, factors, coefficients))
            else:
                exact = sum(ck * lora_product(f[f"{name}.lora_A"], f[f"{name}.lora_B"],
                                              self.scale, spec)
                            for f, ck in zip(factors[:-1], c, strict=True))
                out[spec.weight_key] = self.dense_residual(name, exact)
        return out

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
