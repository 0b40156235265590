"""Plumbing every fedrac strategy shares: seeded sampling, byte ledger, reply checks.

Subclasses implement ``configure_train`` / ``aggregate_train`` with their own rule.
Evaluation is server-side (``evaluate_fn``), so ``configure_evaluate`` sends nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedrac.ledger import ByteLedger, record_dict_nbytes
from fedrac.lora import LayerSpec, check_rank
from fedrac.privacy import Accountant, CentralDP, PrivacySettings
from fedrac.records import array_to_numpy
from fedrac.sketch import DISTRIBUTIONS, derive_seed

CLIENT_KEYS = {  # Hydra `client.*` key -> ConfigRecord key sent to clients
    "optimizer": "optimizer", "lr": "lr", "local_epochs": "local-epochs",
    "local_steps": "local-steps", "batch_size": "batch-size",
    "weight_decay": "weight-decay", "momentum": "momentum",
}
SAMPLING_STREAM = 1  # derive_seed(run_seed, round, SAMPLING_STREAM) picks the round's clients


def client_config_record(client_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``client`` config group as ConfigRecord values (``local-steps`` 0 means unset)."""
    out: dict[str, Any] = {}
    for key, wire in CLIENT_KEYS.items():
        value = client_cfg.get(key)
        if key == "local_steps":
            value = int(value or 0)
        if value is not None:
            out[wire] = value
    return out


@dataclass
class ValidReply:
    """A reply that passed the checks: its tensors, aggregation weight and metrics."""

    node_id: int
    tensors: dict[str, torch.Tensor]
    weight: float
    metrics: MetricRecord


def require_choice(key: str, value: Any, allowed: Sequence[str], owner: str = "") -> None:
    """Raise ``ValueError`` naming ``key``, ``value`` and ``allowed`` unless value is allowed."""
    if value not in allowed:
        where = f" for {owner}" if owner else ""
        raise ValueError(f"{key}={value!r} is not allowed{where}; allowed: {', '.join(allowed)}")


def weighted_average(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``sum_k p_k T_k`` per key with ``p_k = w_k / sum w`` (float64 accumulation)."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, first in tensors[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for t, w in zip(tensors, weights, strict=True):
            acc += t[key].to(torch.float64) * (w / total)
        out[key] = acc.to(first.dtype)
    return out


class FedracStrategy(FedAvg):
    """FedAvg with seeded client sampling, a byte ledger and strict reply checks.

    Sends in every train message a ``config`` ConfigRecord holding the ``client.*``
    settings (``optimizer``, ``lr``, ``local-epochs``, ``local-steps``,
    ``batch-size``, ``weight-decay``, ``momentum``), ``server-round`` and ``mode``.
    """

    name = "base"
    min_clients = 1

    def __init__(
        self, *, run_seed: int, client_config: Mapping[str, Any], fraction_train: float = 1.0,
        min_train_nodes: int = 1, min_available_nodes: int = 1,
        ledger: ByteLedger | None = None, privacy: PrivacySettings | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=1.0,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=0,
            min_available_nodes=max(min_available_nodes, min_train_nodes),
        )
        self.fraction_evaluate = 0.0  # evaluation is server-side (set after FedAvg's warning)
        self.run_seed = int(run_seed)
        self.client_config = client_config_record(client_config)
        self.ledger = ledger or ByteLedger()
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.sent: dict[int, list[Message]] = {}  # round -> train messages awaiting replies
        self.privacy = privacy or PrivacySettings()
        self.dp = CentralDP(self.privacy, self.run_seed) if self.privacy.central else None
        self.local_accountant = Accountant(self.privacy) if self.privacy.mode == "local_dp" \
            else None
        if self.privacy.enabled:
            log(INFO, "%s", self.privacy.describe())

    def set_adapters(
        self, layers: Mapping[str, LayerSpec], rank: int, alpha: float, sketch: str
    ) -> None:
        """Check and keep the LoRA settings of an adapter method (rank, scale, sketch)."""
        require_choice("strategy.sketch", sketch, DISTRIBUTIONS)
        check_rank(layers, rank)
        self.layers = dict(layers)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.sketch = sketch

    # ----------------------------------------------------------------- sending
    def sample_train_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """This round's clients: a seeded sample of ``fraction_train`` of the connected nodes.

        Waits until ``min_available_nodes`` are connected (under Ray, nodes register
        after the ServerApp starts), then samples with ``derive_seed(run_seed, round)``.
        """
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        size = max(int(len(all_nodes) * self.fraction_train), self.min_train_nodes)
        rng = random.Random(derive_seed(self.run_seed, server_round, SAMPLING_STREAM))
        if self.dp is not None and self.privacy.sampling == "poisson":
            # DP accounting with Poisson sampling: each node independently, w.p. q
            chosen = [n for n in sorted(all_nodes) if rng.random() < self.privacy.sample_rate]
            log(INFO, "configure_train: Poisson-sampled %d of %d nodes (q=%.3g)",
                len(chosen), len(all_nodes), self.privacy.sample_rate)
            return chosen
        chosen = sorted(rng.sample(sorted(all_nodes), min(size, len(all_nodes))))
        log(INFO, "configure_train: sampled %d of %d nodes", len(chosen), len(all_nodes))
        return chosen

    def train_config(self, server_round: int, **extra: Any) -> ConfigRecord:
        """The ``config`` record of a train message."""
        return ConfigRecord({**self.client_config, "server-round": server_round, **extra})

    def make_messages(
        self, server_round: int, contents: Mapping[int, RecordDict] | RecordDict,
        node_ids: Iterable[int], kinds: Mapping[str, str],
    ) -> list[Message]:
        """One train message per node (same or per-node content); bytes go to the ledger."""
        messages, sizes = [], {}
        for node_id in node_ids:
            content = contents[node_id] if isinstance(contents, Mapping) and not isinstance(
                contents, RecordDict) else contents
            if id(content) not in sizes:  # a content shared by many nodes is measured once
                sizes[id(content)] = record_dict_nbytes(content, dict(kinds))
            self.ledger.add(server_round, "down", sizes[id(content)])
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        self.sent.setdefault(server_round, []).extend(messages)
        return messages

    @staticmethod
    def reply_node(msg: Message, destinations: Mapping[str, int]) -> int:
        """The node a reply speaks for: its sender, or (for an error the SuperLink sends on
        behalf of an unreachable node) the destination of the message it answers."""
        return destinations.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        """Evaluation is server-side; no evaluate messages are sent."""
        return []

    # --------------------------------------------------------------- receiving
    def collect_replies(
        self, server_round: int, replies: Iterable[Message], array_key: str,
        expected: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str],
    ) -> list[ValidReply]:
        """Replies that carry exactly ``expected`` (key -> shape), finite, with ``num-examples``.

        Others are dropped with a logged reason; nodes sent a message that did not
        reply (timed out, disconnected) are logged by id. Bytes up go to the ledger; the
        round's train loss, client seconds and counts go to ``round_metrics``.
        """
        valid: list[ValidReply] = []
        failed = rejected = 0
        replies = list(replies)
        sent = self.sent.pop(server_round, [])
        to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        missing = sorted({int(m.metadata.dst_node_id) for m in sent}
                         - {self.reply_node(m, to) for m in replies})
        for node in missing:
            log(WARNING, "round %d: node %d did not reply (disconnected or past the round "
                "timeout)", server_round, node)
        for msg in replies:
            node = self.reply_node(msg, to)
            if msg.has_error():
                failed += 1
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            self.ledger.add(server_round, "up", record_dict_nbytes(msg.content, dict(kinds)))
            reason, reply = self._check_reply(msg, array_key, expected)
            if reason:
                rejected += 1
                log(WARNING, "round %d: reply of node %d rejected: %s", server_round, node, reason)
                continue
            valid.append(reply)
        total_w = sum(r.weight for r in valid)
        metrics = {
            "clients": float(len(valid)), "failed": float(failed + len(missing)),
            "rejected": float(rejected),
            "client_seconds": float(sum(float(r.metrics.get("train-seconds", 0.0))
                                        for r in valid)),
            "train_loss": (float(sum(float(r.metrics.get("train-loss", math.nan)) * r.weight
                                     for r in valid) / total_w) if total_w else math.nan),
        }
        self.round_metrics[server_round] = metrics
        log(INFO, "aggregate_train: %d valid, %d failed, %d rejected replies",
            len(valid), failed, rejected)
        return valid

    def average(
        self, server_round: int, valid: Sequence[ValidReply],
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The round's combination of the valid replies' tensors: their weighted average, or
        under ``privacy=dp`` the private mean of the updates ``tensors - reference``
        (``reference`` None: zero; see :mod:`fedrac.privacy`). The one place every strategy
        averages through, so the rule can move into a shared aggregation module."""
        self.note_release(server_round, valid)
        if self.dp is not None:
            return self.private_average(server_round, [r.tensors for r in valid], reference)
        return weighted_average([r.tensors for r in valid], [r.weight for r in valid])

    def private_average(
        self, server_round: int, values: Sequence[Mapping[str, torch.Tensor]],
        reference: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """Central DP over arbitrary per-client tensors (FedEx-LoRA / FLoRA add products)."""
        assert self.dp is not None
        out = self.dp.aggregate(server_round, values, reference)
        self.round_metrics.setdefault(server_round, {}).update(self.dp.round_metrics())
        return out

    def privacy_summary(self) -> dict[str, Any] | None:
        """The resolved privacy settings for summary.json (``None`` without privacy)."""
        if not self.privacy.enabled:
            return None
        return {**self.privacy.__dict__, "accountant": "flwr RdpAccountant (dp-accounting)"}

    def note_release(self, server_round: int, valid: Sequence[ValidReply]) -> None:
        """Local DP: count the round's releases of the replying clients (their epsilon)."""
        if self.local_accountant is not None:
            eps = self.local_accountant.release([r.node_id for r in valid])
            self.round_metrics.setdefault(server_round, {})["epsilon"] = eps

    @staticmethod
    def _check_reply(
        msg: Message, array_key: str, expected: Mapping[str, tuple[int, ...]]
    ) -> tuple[str | None, ValidReply | None]:
        content = msg.content
        metric_records = [r for r in content.values() if isinstance(r, MetricRecord)]
        if array_key not in content or not isinstance(content[array_key], ArrayRecord):
            return f"no ArrayRecord '{array_key}'", None
        if len(metric_records) != 1 or "num-examples" not in metric_records[0]:
            return "no MetricRecord with 'num-examples'", None
        metrics = metric_records[0]
        weight = float(metrics["num-examples"])
        if not weight > 0 or not math.isfinite(weight):
            return f"num-examples={weight} is not positive", None
        record = content[array_key]
        keys = set(record.keys())
        if keys != set(expected):
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            return f"wrong keys (missing {missing[:5]}, unexpected {extra[:5]})", None
        tensors: dict[str, torch.Tensor] = {}
        for key, shape in expected.items():
            arr = array_to_numpy(record[key])
            if tuple(arr.shape) != tuple(shape):
                return f"'{key}' has shape {tuple(arr.shape)}, expected {tuple(shape)}", None
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                return f"'{key}' has non-finite values", None
            tensors[key] = torch.from_numpy(arr)  # array_to_numpy returns a writable copy
        return None, ValidReply(msg.metadata.src_node_id, tensors, weight, metrics)

    def round_metric_record(self, server_round: int) -> MetricRecord:
        """The round's aggregated train metrics as a MetricRecord."""
        return MetricRecord({k: v for k, v in self.round_metrics[server_round].items()
                             if math.isfinite(v)})
