"""A reply names the round (and nonce) of the message it answers: a replayed reply from an
earlier round is dropped with a logged reason."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedrac.adapters import LayerSpec
from strategies import STRATEGIES
from tests.helpers import reply, run_strategy

LAYERS = {"body": LayerSpec("body", (6, 5))}
NODES, REPLAYER = 3, 0


def _run(caplog, replay: bool) -> dict:
    first: dict[int, RecordDict] = {}

    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        if replay and pid == REPLAYER and pid in first:  # round 1's reply, sent again
            return Message(first[pid], reply_to=msg)
        out = reply(msg, "factors", {"body.lora_B": 0.01 * torch.ones(6, 1)}, 10)
        first.setdefault(pid, out.content)
        return out

    strategy = STRATEGIES["rac_lora"](layers=LAYERS, rank=1, alpha=1.0, sketch="orthogonal",
                                      train_factor="B", run_seed=1)
    with caplog.at_level(logging.WARNING):
        run_strategy(strategy, ArrayRecord({"body.weight": torch.zeros(6, 5)}), 3, NODES, train)
    return strategy.round_metrics


def test_a_replayed_reply_is_dropped_with_its_reason(caplog):
    metrics = _run(caplog, replay=True)
    assert metrics[1]["rejected"] == 0 and metrics[1]["clients"] == NODES
    for rnd in (2, 3):
        assert metrics[rnd]["rejected"] == 1 and metrics[rnd]["clients"] == NODES - 1
    assert "stale reply: it names round 1, not 2" in caplog.text


def test_honest_replies_are_kept(caplog):
    metrics = _run(caplog, replay=False)
    assert all(metrics[r]["rejected"] == 0 for r in (1, 2, 3))


def test_a_reply_with_another_rounds_nonce_or_message_is_stale():
    from types import SimpleNamespace

    from flwr.app import MetricRecord

    strategy = STRATEGIES["rac_lora"](layers=LAYERS, rank=1, alpha=1.0, sketch="orthogonal",
                                      train_factor="B", run_seed=1)
    nonce = int(strategy.train_config(4)["round-nonce"])

    def answer(round_nonce: int, to: str = "m1"):
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to),
                               content=RecordDict({"metrics": MetricRecord({
                                   "num-examples": 1, "server-round": 4,
                                   "round-nonce": round_nonce})}))

    assert "round-nonce is not round 4's" in strategy.stale_reason(4, answer(nonce ^ 1), {})
    assert strategy.stale_reason(4, answer(nonce), {"m1": 7}) is None
    assert "answers no message of this round" in strategy.stale_reason(
        4, answer(nonce, "m0"), {"m1": 7})
