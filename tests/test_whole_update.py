"""Norm rules, ``max_update_norm`` and central DP see a client's whole update: its factors and
its trained modules (``model.trainable_modules``, e.g. a new head) under one norm."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedrac.adapters import LayerSpec
from fedrac.privacy.dp import PrivacySettings
from strategies import STRATEGIES
from strategies.aggregation import Aggregator
from tests.helpers import run_strategy

LAYERS = {"body": LayerSpec("body", (6, 5))}
HEAD = "head.weight"
NODES, ATTACKER, BOOST = 5, 0, 1e6


def _initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"body.weight": torch.randn(6, 5, generator=gen),
            HEAD: torch.randn(3, 6, generator=gen)}


def _run(aggregator: Aggregator | None = None, privacy: PrivacySettings | None = None,
         boost: float = BOOST) -> torch.Tensor:
    """One rac_lora round in which every client moves the head by ~0.01 and the attacker by
    ``boost`` times that; returns how far the global head moved (max abs)."""

    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        start = msg.content["arrays"].to_torch_state_dict()[HEAD] if "arrays" in msg.content \
            else _initial()[HEAD]
        gen = torch.Generator().manual_seed(pid)
        head = start + 0.01 * torch.randn(3, 6, generator=gen) * (boost if pid == ATTACKER
                                                                 else 1.0)
        factor = 0.01 * torch.randn(6, 1, generator=gen)
        config = msg.content["config"]
        return Message(RecordDict({
            "factors": ArrayRecord({"body.lora_B": factor}),
            "modules": ArrayRecord({HEAD: head.to(torch.float32)}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.0,
                                     "train-seconds": 0.0, **{
                                         k: config[k] for k in ("server-round", "round-nonce")
                                         if k in config}})}), reply_to=msg)

    strategy = STRATEGIES["rac_lora"](
        layers=LAYERS, rank=1, alpha=1.0, sketch="orthogonal", train_factor="B", run_seed=3,
        aggregator=aggregator, privacy=privacy)
    strategy.set_trainable_modules({HEAD: (3, 6)})
    seen = run_strategy(strategy, ArrayRecord(_initial()), 1, NODES, train)
    return (seen[-1].to_torch_state_dict()[HEAD] - _initial()[HEAD]).abs().max()


def test_honest_clients_move_the_head():
    assert 1e-4 < float(_run(Aggregator("mean", max_update_norm=None), boost=1.0)) < 0.1


@pytest.mark.parametrize("aggregator", [
    Aggregator("norm_clip", max_update_norm=None),
    Aggregator("mean", max_update_norm="auto"),
    Aggregator("mean", max_update_norm=1.0),
], ids=["norm_clip", "max_update_norm_auto", "max_update_norm_1"])
def test_norm_rules_bound_a_boosted_head(aggregator):
    """Without the modules in the norm the boosted head moved the model by ~1e3."""
    assert float(_run(aggregator)) < 0.1


def _dp(clip: float, sigma: float) -> PrivacySettings:
    return PrivacySettings(mode="dp", noise_multiplier=sigma, clip_norm=clip, delta=1e-3,
                           sampling="fixed", num_clients=NODES, cohort=NODES, num_rounds=1)


def test_dp_clips_the_head_with_the_factors():
    """One client may move the private mean by at most clip_norm / cohort (no noise here)."""
    moved = float(_run(privacy=_dp(clip=0.05, sigma=0.0)))
    assert moved <= 0.05 * NODES / NODES + 1e-6


def test_dp_noises_the_head():
    """With noise the head differs from the noise-free private mean (honest clients)."""
    quiet = _run(privacy=_dp(clip=1.0, sigma=0.0), boost=1.0)
    noisy = _run(privacy=_dp(clip=1.0, sigma=1.0), boost=1.0)
    assert abs(float(noisy) - float(quiet)) > 1e-3
