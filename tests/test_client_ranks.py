"""Heterogeneous client ranks for RAC-LoRA: nested slices of one shared sketch, exact merge."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord

from clients.handlers import global_state, own_rank, prepare_adapters
from fedrac.adapters import (
    LayerSpec,
    adapter_factors,
    effective_weights,
    find_target_layers,
    remove_adapters,
)
from fedrac.adapters.sketch import make_sketch
from fedrac.settings.config import ConfigError
from strategies import STRATEGIES
from tests.helpers import reply, run_config, run_strategy

LAYERS = {"rect": LayerSpec("rect", (7, 5)), "sq": LayerSpec("sq", (6, 6))}
RANK, ALPHA, SEED = 3, 4.5, 7
SCALE = ALPHA / RANK
RANKS = [1, 2, 3]


def _initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{n}.weight": torch.randn(*s.weight_shape, generator=gen) for n, s in LAYERS.items()}


def _model() -> torch.nn.Module:
    model = torch.nn.Module()
    for name, spec in LAYERS.items():
        setattr(model, name, torch.nn.Linear(spec.d_in, spec.d_out, bias=False))
    return model


class Clients:
    """Clients through the real adapter path at their own rank; random trained factors."""

    def __init__(self):
        self.local, self.weights, self.shapes, self.factors = {}, {}, {}, {}

    def __call__(self, msg, context):
        pid = int(context.node_config["partition-id"])
        config = msg.content["config"]
        rnd = int(config["server-round"])
        rank_k = own_rank(config, context.node_config)
        model = _model()
        start = global_state(msg.content)
        model.load_state_dict(start)
        prepare_adapters(model, find_target_layers(model, list(LAYERS)), msg.content, rnd, rank_k)
        gen = torch.Generator().manual_seed(100 * rnd + pid)
        with torch.no_grad():  # stands in for local training of the trained factor
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen))
        # the client's local model: the weights its adapted layers compute with
        self.local[(rnd, pid)] = {k: v.double() for k, v in effective_weights(model).items()}
        out = adapter_factors(model, trained_only=True)
        remove_adapters(model)
        self.shapes[(rnd, pid)] = {k: tuple(v.shape) for k, v in out.items()}
        self.factors[(rnd, pid)] = out
        self.weights[pid] = 2 * pid + 1
        return reply(msg, "factors", {k: v.numpy() for k, v in out.items()}, 2 * pid + 1)


@pytest.mark.parametrize("side", ["A", "B", "alternate"])
def test_three_ranks_merge_exactly_to_the_weighted_sum_of_nested_updates(side):
    clients = Clients()
    strategy = STRATEGIES["rac_lora"](layers=LAYERS, rank=RANK, alpha=ALPHA, sketch="gaussian",
                                      train_factor=side, run_seed=SEED,
                                      client_ranks=RANKS)
    seen = run_strategy(strategy, ArrayRecord(_initial()), 2, 3, clients)
    total = sum(clients.weights.values())
    for rnd in (1, 2):
        got = seen[rnd].to_torch_state_dict()
        prev = seen[rnd - 1].to_torch_state_dict()
        trained = "B" if (side == "B" or (side == "alternate" and rnd % 2)) else "A"
        for n, spec in LAYERS.items():
            # each client uploads a factor of its own rank
            assert [clients.shapes[(rnd, p)][f"{n}.lora_{trained}"] for p in range(3)] == \
                [spec.factor_shape(trained, r) for r in RANKS]
            exact = sum(clients.weights[p] / total * clients.local[(rnd, p)][f"{n}.weight"]
                        for p in range(3))
            assert torch.allclose(got[f"{n}.weight"].double(), exact, atol=1e-5, rtol=0)
            # and that is W + sum_k p_k s B_k A_{1:r_k} with the shared sketch's leading slices
            other = "A" if trained == "B" else "B"
            sketch = make_sketch(strategy.round_seed(rnd), f"{n}.lora_{other}",
                                 spec.factor_shape(other, RANK), "gaussian").double()
            expected = torch.zeros(spec.d_out, spec.d_in, dtype=torch.float64)
            for p, r in enumerate(RANKS):
                mine = clients.factors[(rnd, p)][f"{n}.lora_{trained}"].double()
                expected += clients.weights[p] / total * SCALE * (
                    mine @ sketch[:r] if trained == "B" else sketch[:, :r] @ mine)
            delta = got[f"{n}.weight"].double() - prev[f"{n}.weight"].double()
            assert torch.allclose(delta, expected, atol=1e-5, rtol=0)


def test_tiers_give_contiguous_blocks_and_a_node_may_name_its_own_rank():
    config = {"client-ranks": [1, 2, 4], "rank": 4}
    got = [own_rank(config, {"partition-id": p, "num-partitions": 10}) for p in range(10)]
    assert got == [1, 1, 1, 1, 2, 2, 2, 4, 4, 4]
    per_client = {"client-ranks": [1, 1, 2, 2, 4], "rank": 4}
    assert [own_rank(per_client, {"partition-id": p, "num-partitions": 5})
            for p in range(5)] == [1, 1, 2, 2, 4]
    assert own_rank(config, {"lora-rank": 2}) == 2
    assert own_rank({"rank": 4}, {"partition-id": 0, "num-partitions": 2}) is None
    with pytest.raises(ValueError, match="lora-rank=5 is not allowed"):
        own_rank(config, {"lora-rank": 5})


def test_a_reply_of_a_rank_outside_the_list_is_rejected(caplog):
    strategy = STRATEGIES["rac_lora"](layers=LAYERS, rank=RANK, alpha=ALPHA, sketch="gaussian",
                                      train_factor="B", run_seed=SEED,
                                      client_ranks=[1, 3])

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        r = 2 if pid == 0 else 3  # node 0 claims rank 2, which is not offered
        return reply(msg, "factors", {f"{n}.lora_B": torch.ones(s.d_out, r).numpy()
                                      for n, s in LAYERS.items()}, 1)

    with caplog.at_level(logging.WARNING):
        seen = run_strategy(strategy, ArrayRecord(_initial()), 1, 2, train)
    assert "rank 2 of 'rect.lora_B' is not one of strategy.client_ranks [1, 3]" in caplog.text
    assert strategy.round_metrics[1]["rejected"] == 1.0
    after, before = seen[1].to_torch_state_dict(), seen[0].to_torch_state_dict()
    assert not torch.equal(after["rect.weight"], before["rect.weight"])  # node 1 still merged


def test_client_ranks_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy.client_ranks=\[1, 5\] is not allowed"):
        run_config(tmp_path, "strategy.rank=4", "strategy.client_ranks=[1,5]")
    with pytest.raises(ConfigError, match=r"strategy.client_ranks=\[1, 2\] is not allowed"):
        run_config(tmp_path, "strategy=fedit", "+strategy.client_ranks=[1,2]")
