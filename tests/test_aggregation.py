"""Exactness of the server's aggregation, and rejection of malformed replies."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedrac.adapters import LayerSpec
from fedrac.adapters.sketch import derive_seed, fingerprint, make_sketch
from strategies.fedavg import FedAvgFPFT
from strategies.rac_lora import RacLoRA
from tests.helpers import reply, run_strategy

# A rectangular layer and a non-symmetric square one, so a transposition cannot hide.
LAYERS = {"rect": LayerSpec("rect", (7, 5)), "sq": LayerSpec("sq", (6, 6))}
RANK, ALPHA, SEED = 2, 3.0, 11


def _initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{n}.weight": torch.randn(*s.weight_shape, generator=gen) for n, s in LAYERS.items()}


def _client_factor(pid: int, key: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * pid + sum(map(ord, key)))
    return torch.randn(*shape, generator=gen)


def _rac(train_factor: str, **kw) -> RacLoRA:
    return RacLoRA(layers=LAYERS, rank=RANK, alpha=ALPHA, sketch="gaussian",
                   train_factor=train_factor, run_seed=SEED, **kw)


def _weights(pid: int, weighted: bool) -> int:
    return (pid + 1) * 3 if weighted else 10


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("side", ["A", "B"])
def test_rac_lora_merge_is_exactly_the_weighted_sum_of_client_updates(side, weighted):
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        assert msg.content["config"]["train-factor"] == side
        tensors = {f"{n}.lora_{side}": _client_factor(pid, n, s.factor_shape(side, RANK)).numpy()
                   for n, s in LAYERS.items()}
        return reply(msg, "factors", tensors, _weights(pid, weighted))

    initial = _initial()
    seen = run_strategy(_rac(side), ArrayRecord(initial), 1, 4, train)
    merged = seen[-1].to_torch_state_dict()
    seed = derive_seed(SEED, 1)
    total = sum(_weights(p, weighted) for p in range(4))
    other = "B" if side == "A" else "A"
    for n, s in LAYERS.items():
        sketch = make_sketch(seed, f"{n}.lora_{other}", s.factor_shape(other, RANK), "gaussian")
        expected = initial[f"{n}.weight"].double().clone()
        for pid in range(4):
            f = _client_factor(pid, n, s.factor_shape(side, RANK)).double()
            b, a = (sketch.double(), f) if side == "A" else (f, sketch.double())
            expected += _weights(pid, weighted) / total * (ALPHA / RANK) * (b @ a)
        assert torch.allclose(merged[f"{n}.weight"].double(), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(merged[f"{n}.weight"], initial[f"{n}.weight"], atol=1e-3)


def test_rac_lora_sends_seed_and_fingerprint_never_the_sketch():
    messages = []

    def train(msg, context):
        messages.append(msg)
        tensors = {f"{n}.lora_B": np.zeros(s.factor_shape("B", RANK), np.float32)
                   for n, s in LAYERS.items()}
        return reply(msg, "factors", tensors, 1)

    strategy = _rac("B")
    run_strategy(strategy, ArrayRecord(_initial()), 2, 2, train)
    for msg in messages:
        content = msg.content
        assert set(content.keys()) == {"arrays", "sketch", "config"}
        assert set(content["arrays"].keys()) == {"rect.weight", "sq.weight"}
        rnd = int(content["config"]["server-round"])
        seed = derive_seed(SEED, rnd)
        assert content["sketch"]["seed"] == seed
        sketches = {f"{n}.lora_A": make_sketch(seed, f"{n}.lora_A", s.factor_shape("A", RANK),
                                               "gaussian") for n, s in LAYERS.items()}
        assert content["sketch"]["fingerprint"] == fingerprint(sketches)
    assert len({m.content["sketch"]["seed"] for m in messages}) == 2
    kinds_down = strategy.ledger.round_kinds(1, "down")
    assert set(kinds_down) == {"weights", "seeds", "config"}
    assert kinds_down["weights"] == 2 * sum(len(a.data) for a in messages[0].content["arrays"]
                                            .values())
    assert set(strategy.ledger.round_kinds(1, "up")) == {"factors", "metrics"}


def test_malformed_replies_are_dropped_and_the_valid_one_is_merged():
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        good = {f"{n}.lora_B": _client_factor(pid, n, s.factor_shape("B", RANK)).numpy()
                for n, s in LAYERS.items()}
        if pid == 0:
            good["rect.lora_B"][0, 0] = math.nan
        elif pid == 1:
            good["sq.lora_B"] = np.zeros((6, 3), np.float32)
        elif pid == 2:
            del good["sq.lora_B"]
        elif pid == 4:
            raise RuntimeError("client crashed")
        return reply(msg, "factors", good, 5)

    strategy = _rac("B")
    initial = _initial()
    seen = run_strategy(strategy, ArrayRecord(initial), 1, 5, train)
    merged = seen[-1].to_torch_state_dict()
    assert strategy.round_metrics[1]["clients"] == 1
    assert strategy.round_metrics[1]["rejected"] == 3
    assert strategy.round_metrics[1]["failed"] == 1
    seed = derive_seed(SEED, 1)
    for n, s in LAYERS.items():
        a = make_sketch(seed, f"{n}.lora_A", s.factor_shape("A", RANK), "gaussian")
        expected = initial[f"{n}.weight"] + ALPHA / RANK * (
            _client_factor(3, n, s.factor_shape("B", RANK)) @ a)
        assert torch.allclose(merged[f"{n}.weight"], expected, atol=1e-5)


def test_a_round_without_valid_replies_changes_nothing():
    def train(msg, context):
        return reply(msg, "factors", {"rect.lora_B": np.zeros((7, 2), np.float32)}, 5)

    initial = _initial()
    seen = run_strategy(_rac("B"), ArrayRecord(initial), 2, 3, train)
    for arrays in seen:
        got = arrays.to_torch_state_dict()
        assert all(torch.equal(got[k], initial[k]) for k in initial)


@pytest.mark.parametrize("weighted", [False, True])
def test_fedavg_is_the_exact_weighted_average(weighted):
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        tensors = {k: _client_factor(pid, k, v.shape).numpy() for k, v in _initial().items()}
        return reply(msg, "arrays", tensors, _weights(pid, weighted))

    seen = run_strategy(FedAvgFPFT(run_seed=0), ArrayRecord(_initial()), 1, 3,
                        train)
    got = seen[-1].to_torch_state_dict()
    total = sum(_weights(p, weighted) for p in range(3))
    for k, v in _initial().items():
        expected = sum(_weights(p, weighted) / total * _client_factor(p, k, v.shape).double()
                       for p in range(3))
        assert torch.allclose(got[k].double(), expected, atol=1e-6)


def test_partial_participation_samples_reproducibly():
    picked = []

    def train(msg, context):
        picked.append((int(msg.content["config"]["server-round"]),
                       int(context.node_config["partition-id"])))
        tensors = {f"{n}.lora_B": np.zeros(s.factor_shape("B", RANK), np.float32)
                   for n, s in LAYERS.items()}
        return reply(msg, "factors", tensors, 1)

    run_strategy(_rac("B", fraction_train=0.3), ArrayRecord(_initial()), 4, 10, train)
    first = list(picked)
    picked.clear()
    run_strategy(_rac("B", fraction_train=0.3), ArrayRecord(_initial()), 4, 10, train)
    assert picked == first
    assert all(sum(1 for r, _ in first if r == rnd) == 3 for rnd in range(1, 5))
    assert len({tuple(p for r, p in first if r == rnd) for rnd in range(1, 5)}) > 1
