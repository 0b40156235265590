"""FLoRA: the server stacks the clients' factors so their product is exactly the average."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedrac.adapters import LayerSpec
from strategies.base import ValidReply
from strategies.two_factor import TwoFactorLoRA, lora_product


class FLoRA(TwoFactorLoRA):
    """Stacking aggregation; clients start fresh adapters every round.

    Rule: ``B_stack = [s p_1 B_1, ..., s p_K B_K]`` (``d_out x K r``),
    ``A_stack = [A_1; ...; A_K]`` (``K r x d_in``), ``W <- W + B_stack @ A_stack``
    ``= W + s * sum_k p_k B_k A_k`` (exact up to the stacks' float32 rounding; the server
    merges the float32 stacks it sends). The stacked factors go to the clients
    next round as the ``update`` record (kind ``factors``) on top of the previous
    weights, so the download grows with the number of clients. Config keys as FedIT.
    Stacking needs one coefficient ``p_k`` per client: ``aggregation=mean`` or ``norm_clip``
    (exact for the clipped factors); ``median`` and ``trimmed_mean`` are refused.

    Under ``privacy=dp`` the stack cannot be sent: it is every client's own factors, i.e.
    no aggregate at all. A client's update is then its dense product ``s B_k A_k`` (its
    adapters start at zero product), privatised as one mean; the merge is that dense mean,
    and the ``update`` record carries it (kind ``residual``, ``d_out * d_in`` per layer).
    Under ``privacy=local_dp`` the factors are already noised by each client and are stacked.
    """

    name = "flora"
    linear_aggregation_only = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if not self.aggregator.rule.linear:
            raise ValueError(f"aggregation={self.aggregator.rule.name} is not allowed for "
                             "strategy flora; allowed: mean, norm_clip")

    def combine(self, server_round: int, valid: list[ValidReply]) -> None:
        """Stack the weighted factors, merge their product and restart the adapters."""
        if self.dp is not None:
            self.private_combine(server_round, valid)
            return
        self.note_release(server_round, valid)
        p = self.aggregator.coefficients([r.weight for r in valid]).tolist()
        self.merge_into_base(stack_factors(self.layers, [r.tensors for r in valid],
                                           [self.scale * pk for pk in p]), as_update=True)
        self.adapters = None

    def private_combine(self, server_round: int, valid: list[ValidReply]) -> None:
        """Central DP: the private mean of the clients' dense products, merged and sent."""
        self.kinds["update"] = "residual"
        products = [{name: lora_product(r.tensors[f"{name}.lora_A"], r.tensors[f"{name}.lora_B"],
                                        self.scale, spec) for name, spec in self.layers.items()}
                    for r in valid]
        self.note_release(server_round, valid)
        deltas = self.private_average(server_round, products, None,
                                      modules=[r.modules for r in valid])
        self.merge_into_base({self.layers[n].weight_key: d.to(torch.float32)
                              for n, d in deltas.items()}, as_update=True)
        self.adapters = None


def stack_factors(
    layers: Mapping[str, LayerSpec], factors: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[float],
) -> dict[str, torch.Tensor]:
    """``<layer>.stack_B = [c_1 B_1, ..., c_K B_K]`` and ``<layer>.stack_A = [A_1; ...; A_K]``
    (float32): their product is ``sum_k c_k B_k A_k``."""
    out = {}
    for name in layers:
        out[f"{name}.stack_B"] = torch.cat(
            [f[f"{name}.lora_B"].to(torch.float64) * c
             for f, c in zip(factors, coefficients, strict=True)], dim=1).float()
        out[f"{name}.stack_A"] = torch.cat([f[f"{name}.lora_A"].float() for f in factors], dim=0)
    return out
