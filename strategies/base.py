"""Plumbing every fedrac strategy shares: seeded sampling, byte ledger, reply checks.

Subclasses implement ``configure_train`` / ``aggregate_train`` with their own rule; they
average through :meth:`FedracStrategy.average`, i.e. the run's
:class:`~strategies.aggregation.Aggregator` (``aggregation=mean|trimmed_mean|median|
norm_clip``). Evaluation is server-side (``evaluate_fn``) and, with ``fraction_evaluate > 0``,
also client-side: every ``eval_every`` rounds (and in the last one) a seeded sample of the
nodes gets an ``evaluate`` message with the global weights
(:meth:`FedracStrategy.configure_evaluate`).
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedrac.adapters import FACTOR_DTYPE, LayerSpec, adapter_dtype, check_rank
from fedrac.adapters.sketch import DISTRIBUTIONS, derive_seed
from fedrac.models.merged_factors import MergedFactors
from fedrac.privacy.dp import Accountant, CentralDP, PrivacySettings
from fedrac.settings.typed import ClientSettings
from fedrac.wire.ledger import ByteLedger, record_dict_nbytes
from fedrac.wire.records import array_to_tensor, to_shared_state_dict
from strategies.aggregation import Aggregator, normalised, scaled

CLIENT_KEYS = {  # Hydra `client.*` key -> ConfigRecord key sent to clients
    "optimizer": "optimizer", "lr": "lr", "local_epochs": "local-epochs",
    "local_steps": "local-steps", "batch_size": "batch-size",
    "weight_decay": "weight-decay", "weight_decay_mode": "weight-decay-mode",
    "momentum": "momentum",
    "full_lr": "full-lr", "warmup_steps": "warmup-steps", "max_grad_norm": "max-grad-norm",
    "refactor": "refactor", "refactor_eps": "refactor-eps",
    "refactor_interval": "refactor-interval", "refactor_warmup_steps": "refactor-warmup-steps",
    "projected_step": "projected-step",
    "precision": "precision", "grad_accum_steps": "grad-accum-steps",
}
OFF = {"full_lr": None, "warmup_steps": 0, "max_grad_norm": None,  # not sent when so
       "weight_decay_mode": "auto", "refactor": "none", "projected_step": False,
       "precision": "fp32", "grad_accum_steps": 1}
REFACTOR_KEYS = ("refactor_eps", "refactor_interval", "refactor_warmup_steps")
MODULES_KEY = "modules"  # reply record of the fully trained modules (ledger kind "modules")
ROUND_NONCE = "round-nonce"  # train config key a reply echoes in its metrics (with the round)
MODULE_PREFIX = "\0modules/"  # trained modules' keys when measured together with the factors
SAMPLING_STREAM = 1  # derive_seed(run_seed, round, SAMPLING_STREAM) picks the round's clients
EVAL_STREAM = 6  # derive_seed(run_seed, round, EVAL_STREAM) picks the clients that evaluate
EVAL_KINDS = {"arrays": "eval", "config": "eval", "metrics": "eval"}  # ledger kind of evaluation
CLIENT_WEIGHTINGS = ("examples", "uniform")  # strategy.client_weighting


def client_config_record(client: ClientSettings | None) -> dict[str, Any]:
    """The ``client`` settings as ConfigRecord values (``local-steps`` 0 means unset; none
    without settings)."""
    out: dict[str, Any] = {}
    if client is None:
        return out
    refactor_off = client.refactor == "none"
    for key, wire in CLIENT_KEYS.items():
        value = getattr(client, key)
        if refactor_off and key in REFACTOR_KEYS:
            continue
        if key == "local_steps":
            value = int(value or 0)
        if key in OFF and value == OFF[key]:
            continue
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
    modules: dict[str, torch.Tensor] = field(default_factory=dict)


def require_choice(key: str, value: Any, allowed: Sequence[str], owner: str = "") -> None:
    """Raise ``ValueError`` naming ``key``, ``value`` and ``allowed`` unless value is allowed."""
    if value not in allowed:
        where = f" for {owner}" if owner else ""
        raise ValueError(f"{key}={value!r} is not allowed{where}; allowed: {', '.join(allowed)}")


def client_eval_metrics(results: Sequence[tuple[float, Mapping[str, float]]]
                        ) -> dict[str, float]:
    """``client_eval_<m>`` (mean weighted by examples) and ``_std`` / ``_min`` / ``_max``
    (across clients, unweighted) for ``m`` in loss, accuracy, from ``(examples, values)``."""
    out: dict[str, float] = {"client_eval_clients": float(len(results))}
    for key in ("loss", "accuracy"):
        pairs = [(w, v[key]) for w, v in results if key in v]
        if not pairs or len(pairs) != len(results):
            continue
        values = np.array([v for _, v in pairs], dtype=np.float64)
        weights = np.array([w for w, _ in pairs], dtype=np.float64)
        name = f"client_eval_{key}"
        out[name] = float(np.sum(weights * values) / np.sum(weights))
        out[f"{name}_std"] = float(values.std())
        out[f"{name}_min"], out[f"{name}_max"] = float(values.min()), float(values.max())
    return out


def weighted_average(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``sum_k p_k T_k`` per key with ``p_k = w_k / sum w`` (float64 accumulation; the
    weights are normalised without overflow, see :func:`strategies.aggregation.normalised`)."""
    p = normalised(weights).tolist()
    out: dict[str, torch.Tensor] = {}
    for key, first in tensors[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for t, pk in zip(tensors, p, strict=True):
            acc += t[key].to(torch.float64) * pk
        out[key] = acc.to(first.dtype)
    return out


def joint(reply: ValidReply) -> dict[str, torch.Tensor]:
    """A reply's tensors and trained modules as one mapping (modules under
    :data:`MODULE_PREFIX`): what one client's update norm is measured over."""
    if not reply.modules:
        return reply.tensors
    return {**reply.tensors, **{MODULE_PREFIX + k: v for k, v in reply.modules.items()}}


def joint_reference(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, torch.Tensor],
                    reference: Mapping[str, torch.Tensor] | None,
                    module_reference: Mapping[str, torch.Tensor] | None
                    ) -> dict[str, torch.Tensor]:
    """The reference of :func:`joint` values: ``reference`` for the tensors, ``module_reference``
    for the modules (zeros where either is ``None``)."""
    out = dict(reference) if reference is not None else {
        k: torch.zeros_like(v) for k, v in tensors.items()}
    for k, v in modules.items():
        out[MODULE_PREFIX + k] = torch.zeros_like(v) if module_reference is None \
            else module_reference[k]
    return out


def _number(metrics: MetricRecord, key: str, default: float) -> float:
    """A reply's scalar metric as a float (``default`` when absent, not a number or not finite)."""
    value = metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(float(value)):
        return default
    return float(value)


class FedracStrategy(FedAvg):
    """FedAvg with seeded client sampling, a byte ledger, strict reply checks and the run's
    aggregation rule (``aggregator``; default: ``mean`` with ``num-examples`` capped at 10x
    the round's median claim).

    ``client_weighting``: ``examples`` (each reply's weight is its capped ``num-examples``)
    or ``uniform`` (every valid reply weighs 1, the paper's ``1/M`` average); the weights
    are what the aggregation rule (and the train-loss mean) takes.

    Sends in every train message a ``config`` ConfigRecord holding the ``client.*``
    settings (``optimizer``, ``lr``, ``local-epochs``, ``local-steps``,
    ``batch-size``, ``weight-decay``, ``momentum``), ``server-round`` and ``mode``.
    """

    name = "base"
    min_clients = 1

    def __init__(
        self, *, run_seed: int, client: ClientSettings | None = None, fraction_train: float = 1.0,
        min_train_nodes: int = 1, min_available_nodes: int = 1,
        ledger: ByteLedger | None = None, aggregator: Aggregator | None = None,
        fraction_evaluate: float = 0.0, eval_every: int = 1, num_rounds: int | None = None,
        privacy: PrivacySettings | None = None, client_weighting: str = "examples",
    ) -> None:
        require_choice("strategy.client_weighting", client_weighting, CLIENT_WEIGHTINGS)
        self.client_weighting = client_weighting
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=1.0,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=0,
            min_available_nodes=max(min_available_nodes, min_train_nodes),
        )
        self.fraction_evaluate = float(fraction_evaluate)  # set after FedAvg's warning for 0
        self.eval_every, self.num_rounds = int(eval_every), num_rounds
        self.run_seed = int(run_seed)
        self.client_config = client_config_record(client)
        self.ledger = ledger or ByteLedger()
        self.privacy = privacy or PrivacySettings()
        self.aggregator = aggregator or Aggregator(  # DP bounds updates by its own clip
            max_update_norm=None if self.privacy.central else "default", run_seed=self.run_seed)
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.last_problem: str | None = None  # why the latest failed or rejected reply was lost
        self.sent: dict[int, list[Message]] = {}  # round -> train messages awaiting replies
        self.privacy = privacy or PrivacySettings()
        self.dp = CentralDP(self.privacy, self.run_seed) if self.privacy.central else None
        self.local_accountant = Accountant(self.privacy) if self.privacy.mode == "local_dp" \
            else None
        if self.privacy.enabled:
            log(INFO, "%s", self.privacy.describe())
        self.sent_eval: dict[int, list[Message]] = {}  # round -> evaluate messages
        # sent in every train/evaluate config: the run's data statistics (``data-mean`` /
        # ``data-std``, see fedrac.data.standardise) for nodes that read their own data-path
        self.data_config: dict[str, Any] = {}
        self.module_shapes: dict[str, tuple[int, ...]] = {}
        self.merged: MergedFactors | None = None  # adapter methods: the merges, low-rank
        self.module_reference: dict[str, torch.Tensor] | None = None  # the round's start
        self.nonces: dict[int, int] = {}  # round -> the nonce its replies must echo
        self.dp_modules: dict[str, torch.Tensor] | None = None  # DP's mean module update

    def set_trainable_modules(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """The parameters clients train in full beside the adapters (``model.trainable_modules``,
        e.g. a new classifier head): every reply must carry them in a ``modules`` record
        (ledger kind ``modules``); :meth:`apply_modules` averages them FedAvg-style."""
        self.module_shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}

    def apply_modules(self, server_round: int, state: Mapping[str, torch.Tensor],
                      valid: Sequence[ValidReply]) -> dict[str, torch.Tensor]:
        """``state`` with the trained modules replaced by the round's aggregate of them (the
        run's aggregation rule, on the updates against ``state``'s modules)."""
        out = dict(state)
        if not self.module_shapes or not valid:
            return out
        if self.dp is not None:  # the private mean update of private_average (noised)
            if self.dp_modules is None:
                raise RuntimeError("privacy=dp: the trained modules were not privatised")
            for key, delta in self.dp_modules.items():
                out[key] = (out[key].to(torch.float64) + delta).to(out[key].dtype)
            return out
        reference = {k: out[k] for k in self.module_shapes if k in out} or None
        if reference is not None and len(reference) != len(self.module_shapes):
            reference = None
        avg = self.aggregator.aggregate(server_round, [r.modules for r in valid],
                                        [r.weight for r in valid], reference)
        for key, value in avg.items():
            out[key] = value.to(out[key].dtype) if key in out else value
        return out

    def _module_start(self, module_reference: Mapping[str, torch.Tensor] | None
                      ) -> dict[str, torch.Tensor] | None:
        """The trained modules' values the clients started from (``None``: zero), kept in
        :attr:`module_reference` for the round."""
        ref = None
        if self.module_shapes and module_reference is not None and \
                all(k in module_reference for k in self.module_shapes):
            ref = {k: module_reference[k] for k in self.module_shapes}
        self.module_reference = ref
        return ref

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
        self.merged = MergedFactors(self.layers)

    def export_factors(self) -> MergedFactors | None:
        """``W - W0`` per target layer as stacked factors (``None`` when the run's merges have
        no low-rank record: the export then takes the dense SVD)."""
        return self.merged if self.merged is not None and self.merged.usable else None

    def factor_dtypes(
        self, weights: Mapping[str, torch.Tensor], keys: Iterable[str]
    ) -> dict[str, torch.dtype]:
        """The expected dtype of each ``<layer>.lora_<side>`` key: :func:`adapter_dtype` of the
        layer's weight in ``weights`` (the global state the server sent or keeps)."""
        return {key: adapter_dtype(weights[self.layers[key.rpartition(".lora_")[0]]
                                           .weight_key].dtype) for key in keys}

    def collect_factor_replies(
        self, server_round: int, replies: Iterable[Message],
        expected: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str],
    ) -> tuple[dict[str, torch.Tensor], list[ValidReply], MetricRecord]:
        """The global state (read-only views), the round's valid ``factors`` replies (checked
        against ``expected`` shapes and the layers' adapter dtypes; trained modules against
        the global ones) and the round's metric record."""
        current = to_shared_state_dict(self._global)
        valid = self.collect_replies(server_round, replies, "factors", expected, kinds,
                                     dtypes=self.factor_dtypes(current, expected),
                                     module_reference=current)
        return current, valid, self.round_metric_record(server_round)

    # ----------------------------------------------------------------- sending
    def same_message(self, server_round: int, content: RecordDict, nodes: Iterable[int],
                     message_type: str, kinds: Mapping[str, str]) -> list[Message]:
        """One message of ``content`` to each of ``nodes``, each counted as sent down."""
        size = record_dict_nbytes(content, kinds)
        messages = []
        for node in nodes:
            self.ledger.add(server_round, "down", size)
            messages.append(Message(content=content, message_type=message_type,
                                    dst_node_id=node))
        return messages

    def sample_train_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """This round's clients: a seeded sample of ``fraction_train`` of the connected nodes.

        Waits until ``min_available_nodes`` are connected (under Ray, nodes register
        after the ServerApp starts), then samples with ``derive_seed(run_seed, round)``.
        """
        return self._sample(grid, server_round, self.fraction_train, self.min_train_nodes,
                            SAMPLING_STREAM, "configure_train")

    def _sample(self, grid: Grid, server_round: int, fraction: float, minimum: int,
                stream: int, what: str) -> list[int]:
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        size = max(int(len(all_nodes) * fraction), minimum)
        rng = random.Random(derive_seed(self.run_seed, server_round, stream))
        if stream == SAMPLING_STREAM and self.dp is not None and \
                self.privacy.sampling == "poisson":
            # DP accounting with Poisson sampling: each node independently, w.p. q
            chosen = [n for n in sorted(all_nodes) if rng.random() < self.privacy.sample_rate]
            log(INFO, "configure_train: Poisson-sampled %d of %d nodes (q=%.3g)",
                len(chosen), len(all_nodes), self.privacy.sample_rate)
            return chosen
        chosen = sorted(rng.sample(sorted(all_nodes), min(size, len(all_nodes))))
        log(INFO, "%s: sampled %d of %d nodes", what, len(chosen), len(all_nodes))
        return chosen

    def train_config(self, server_round: int, **extra: Any) -> ConfigRecord:
        """The ``config`` record of a train message (with the round and its nonce, which a
        reply must echo: see :func:`clients.handlers.bind_reply`)."""
        return ConfigRecord({**self.client_config, **self.data_config,
                             "server-round": server_round,
                             ROUND_NONCE: self.round_nonce(server_round), **extra})

    def round_nonce(self, server_round: int) -> int:
        """A fresh random number for the round (62 bits with the top one set: every nonce
        takes the same bytes on the wire, so the byte ledger stays deterministic)."""
        if server_round not in self.nonces:
            self.nonces = {server_round: secrets.randbits(61) | (1 << 61)}
        return self.nonces[server_round]

    def stale_reason(self, server_round: int, msg: Message,
                     sent_ids: Mapping[str, int]) -> str | None:
        """Why a reply is not an answer to this round's message (``None``: it is): it must
        answer a message sent this round and echo the round and its nonce."""
        if sent_ids and msg.metadata.reply_to_message_id not in sent_ids:
            return "stale reply: it answers no message of this round"
        metrics = [r for r in msg.content.values() if isinstance(r, MetricRecord)]
        echoed = metrics[0] if len(metrics) == 1 else {}
        rnd, nonce = echoed.get("server-round"), echoed.get(ROUND_NONCE)
        if rnd != server_round:
            return f"stale reply: it names round {rnd}, not {server_round}"
        if nonce != self.nonces.get(server_round):
            return f"stale reply: its {ROUND_NONCE} is not round {server_round}'s"
        return None

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

    # ------------------------------------------------------ client-side evaluation
    def evaluates_clients(self, server_round: int) -> bool:
        """Whether round ``server_round`` sends evaluate messages (``fraction_evaluate > 0``,
        every ``eval_every`` rounds and in the last one)."""
        return self.fraction_evaluate > 0 and (
            server_round % self.eval_every == 0 or server_round == self.num_rounds)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global weights to a seeded sample of ``fraction_evaluate`` of the nodes.

        Each message carries ``arrays`` (the weights the server also evaluates) and
        ``config`` (``server-round``); the node evaluates them on its validation share
        (``partitioner.val_fraction``; its whole partition when that is 0). Bytes go to the
        ledger as kind ``eval``. No messages when the round does not evaluate.
        """
        if not self.evaluates_clients(server_round):
            return []
        nodes = self._sample(grid, server_round, self.fraction_evaluate, 1, EVAL_STREAM,
                             "configure_evaluate")
        content = RecordDict({"arrays": arrays,
                              "config": ConfigRecord({**self.data_config,
                                                      "server-round": server_round})})
        messages = self.same_message(server_round, content, nodes, MessageType.EVALUATE,
                                     EVAL_KINDS)
        self.sent_eval[server_round] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Weighted means (by ``num-examples``) of the clients' ``eval-loss`` and
        ``eval-accuracy``, with their spread across clients (std, min, max).

        They go to ``round_metrics`` as ``client_eval_loss``, ``client_eval_loss_std``,
        ``client_eval_loss_min``, ``client_eval_loss_max``, the same for ``accuracy`` (when
        the replies carry it) and ``client_eval_clients``. Failed replies and replies
        without a positive ``num-examples`` or with a non-finite loss are logged and left out.
        """
        sent = self.sent_eval.pop(server_round, [])
        if not sent:
            return None
        to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        results: list[tuple[float, dict[str, float]]] = []
        for msg in replies:
            node = self.reply_node(msg, to)
            if msg.has_error():
                log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, node,
                    msg.error.reason)
                continue
            self.ledger.add(server_round, "up", record_dict_nbytes(msg.content, EVAL_KINDS))
            reason, result = self._check_eval_reply(msg)
            if reason:
                log(WARNING, "round %d: evaluation of node %d rejected: %s", server_round,
                    node, reason)
                continue
            results.append(result)
        metrics = client_eval_metrics(results)
        self.round_metrics.setdefault(server_round, {}).update(metrics)
        return MetricRecord({k: v for k, v in metrics.items() if math.isfinite(v)})

    @staticmethod
    def _check_eval_reply(msg: Message) -> tuple[str | None, tuple[float, dict[str, float]]]:
        records = [r for r in msg.content.values() if isinstance(r, MetricRecord)]
        if len(records) != 1 or "num-examples" not in records[0]:
            return "no MetricRecord with 'num-examples'", (0.0, {})
        m = records[0]
        weight = float(m["num-examples"])
        if not weight > 0 or not math.isfinite(weight):
            return f"num-examples={weight} is not positive", (0.0, {})
        values = {}
        for key in ("loss", "accuracy"):
            if f"eval-{key}" in m:
                values[key] = float(m[f"eval-{key}"])
        if not math.isfinite(values.get("loss", math.nan)):
            return f"eval-loss={values.get('loss')} is not a finite number", (0.0, {})
        return None, (weight, values)

    # --------------------------------------------------------------- receiving
    def collect_replies(
        self, server_round: int, replies: Iterable[Message], array_key: str,
        expected: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str],
        reference: Mapping[str, torch.Tensor] | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
        module_reference: Mapping[str, torch.Tensor] | None = None,
    ) -> list[ValidReply]:
        """Replies that carry exactly ``expected`` (key -> shape) in the expected dtypes, finite,
        with a positive ``num-examples``, and that pass the aggregator's screen.

        ``dtypes`` (key -> dtype; default :data:`FACTOR_DTYPE` for every key) is what the
        server sent or keeps for each tensor; ``reference`` is what the clients started from
        (default zero), against which the screen measures each update. Rejected replies are
        dropped with a logged reason; a weight over ``max_client_weight`` is capped; the
        rule's per-client scaling (``norm_clip``) is applied to the returned tensors. Nodes
        sent a message that did not reply (timed out, disconnected) are logged by id. Bytes
        up go to the ledger; the round's train loss, client seconds and counts go to
        ``round_metrics``.

        With trained modules (``model.trainable_modules``) the screen measures one norm per
        client over its tensors and its modules together (the modules' update taken against
        ``module_reference``, the global modules the client started from), and the rule's
        scale is applied to both.
        """
        checked: list[ValidReply] = []
        failed = rejected = 0
        replies = list(replies)
        sent = self.sent.pop(server_round, [])
        to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        missing = sorted({int(m.metadata.dst_node_id) for m in sent}
                         - {self.reply_node(m, to) for m in replies})
        for node in missing:
            log(WARNING, "round %d: node %d did not reply (disconnected or past the round "
                "timeout)", server_round, node)
        kinds = {MODULES_KEY: "modules", **kinds}
        for msg in replies:
            node = self.reply_node(msg, to)
            if msg.has_error():
                failed += 1
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                self.last_problem = f"node failed: {msg.error.reason}"
                continue
            self.ledger.add(server_round, "up", record_dict_nbytes(msg.content, dict(kinds)))
            reason = self.stale_reason(server_round, msg, to)
            reply = None
            if reason is None:
                reason, reply = self._check_reply(msg, array_key, expected, dtypes)
            if reason is None and self.module_shapes and array_key != "arrays":
                reason = self._check_modules(msg, reply)
            if reason:
                rejected += 1
                log(WARNING, "round %d: reply of node %d rejected: %s", server_round, node, reason)
                self.last_problem = f"reply rejected: {reason}"
                continue
            checked.append(reply)
        mod_ref = self._module_start(module_reference)
        joint_ref = joint_reference(checked[0].tensors, checked[0].modules, reference,
                                    mod_ref) if checked and checked[0].modules else reference
        kept, weights, scales = self.aggregator.screen(
            server_round, [r.node_id for r in checked], [joint(r) for r in checked],
            [r.weight for r in checked], joint_ref)
        rejected += len(checked) - len(kept)
        if self.client_weighting == "uniform":  # 1/M, the paper's average
            weights = [1.0] * len(weights)
        valid = []
        for i, w, scale in zip(kept, weights, scales, strict=True):
            r = checked[i]
            tensors = r.tensors if scale == 1.0 else scaled(r.tensors, reference, scale)
            modules = r.modules if scale == 1.0 or not r.modules else \
                scaled(r.modules, mod_ref, scale)
            valid.append(ValidReply(r.node_id, tensors, w, r.metrics, modules))
        total_w = sum(r.weight for r in valid)
        metrics = {
            "clients": float(len(valid)), "failed": float(failed + len(missing)),
            "rejected": float(rejected),
            "client_seconds": float(sum(_number(r.metrics, "train-seconds", 0.0)
                                        for r in valid)),
            "train_loss": (float(sum(_number(r.metrics, "train-loss", math.nan) * r.weight
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
        """The round's aggregate of the valid replies' tensors: ``reference + rule(updates)``
        (``reference`` ``None``: zero), in the reference's (else the replies') dtypes; under
        ``privacy=dp`` the private mean of the updates instead (see :mod:`fedrac.privacy.dp`;
        DP takes the place of the aggregation rule, whose combination with DP is checked at
        start)."""
        self.note_release(server_round, valid)
        if self.dp is not None:
            return self.private_average(server_round, [r.tensors for r in valid], reference,
                                        modules=[r.modules for r in valid])
        return self.aggregator.aggregate(server_round, [r.tensors for r in valid],
                                         [r.weight for r in valid], reference)

    def private_average(
        self, server_round: int, values: Sequence[Mapping[str, torch.Tensor]],
        reference: Mapping[str, torch.Tensor] | None,
        modules: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Central DP over arbitrary per-client tensors (FedEx-LoRA / FLoRA add products).

        ``modules`` (each client's trained modules, see :meth:`set_trainable_modules`) are
        clipped together with ``values`` (one norm per client) and noised with them; their
        private mean update is kept for :meth:`apply_modules`."""
        assert self.dp is not None
        self.dp_modules = None
        if self.module_shapes and modules and all(modules):
            ref = joint_reference(values[0], modules[0], reference, self.module_reference)
            both = self.dp.aggregate(server_round, [
                {**v, **{MODULE_PREFIX + k: t for k, t in m.items()}}
                for v, m in zip(values, modules, strict=True)], ref)
            self.dp_modules = {k[len(MODULE_PREFIX):]: t.to(torch.float64)
                               - ref[k].to(torch.float64)
                               for k, t in both.items() if k.startswith(MODULE_PREFIX)}
            out = {k: t for k, t in both.items() if not k.startswith(MODULE_PREFIX)}
            self.round_metrics.setdefault(server_round, {}).update(self.dp.round_metrics())
            return out
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
        msg: Message, array_key: str, expected: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> tuple[str | None, ValidReply | None]:
        content = msg.content
        metric_records = [r for r in content.values() if isinstance(r, MetricRecord)]
        if array_key not in content or not isinstance(content[array_key], ArrayRecord):
            return f"no ArrayRecord '{array_key}'", None
        if len(metric_records) != 1 or "num-examples" not in metric_records[0]:
            return "no MetricRecord with 'num-examples'", None
        metrics = metric_records[0]
        raw = metrics["num-examples"]
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return f"num-examples={raw!r} is not a number", None
        weight = float(raw)
        if not weight > 0 or not math.isfinite(weight):
            return f"num-examples={weight} is not positive", None
        record = content[array_key]
        keys = set(record.keys())
        if keys != set(expected):
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            return f"wrong keys (missing {missing[:5]}, unexpected {extra[:5]})", None
        tensors: dict[str, torch.Tensor] = {}
        for key, shape in expected.items():
            want = FACTOR_DTYPE if dtypes is None else dtypes[key]
            try:
                tensor = array_to_tensor(record[key])
            except Exception as err:  # noqa: BLE001 - any undecodable bytes are a bad reply
                return f"'{key}' cannot be decoded ({type(err).__name__})", None
            if tensor.dtype != want:
                return (f"'{key}' has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                        f"expected {str(want).removeprefix('torch.')}"), None
            if tuple(tensor.shape) != tuple(shape):
                return f"'{key}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}", None
            if (tensor.is_floating_point() or tensor.is_complex()) and \
                    not bool(torch.isfinite(tensor).all()):
                return f"'{key}' has non-finite values", None
            tensors[key] = tensor
        return None, ValidReply(msg.metadata.src_node_id, tensors, weight, metrics)

    def _check_modules(self, msg: Message, reply: ValidReply) -> str | None:
        """Why the reply's ``modules`` record is unusable (``None``: kept in ``reply``)."""
        record = msg.content.get(MODULES_KEY) if MODULES_KEY in msg.content else None
        if not isinstance(record, ArrayRecord):
            return f"no ArrayRecord '{MODULES_KEY}' (model.trainable_modules)"
        keys = set(record.keys())
        if keys != set(self.module_shapes):
            missing, extra = sorted(set(self.module_shapes) - keys), sorted(keys - set(
                self.module_shapes))
            return f"wrong '{MODULES_KEY}' keys (missing {missing[:5]}, unexpected {extra[:5]})"
        for key, shape in self.module_shapes.items():
            try:
                tensor = array_to_tensor(record[key])
            except Exception as err:  # noqa: BLE001 - any undecodable bytes are a bad reply
                return f"'{key}' cannot be decoded ({type(err).__name__})"
            if tensor.dtype != FACTOR_DTYPE:
                return (f"'{key}' has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                        f"expected {str(FACTOR_DTYPE).removeprefix('torch.')}")
            if tuple(tensor.shape) != shape:
                return f"'{key}' has shape {tuple(tensor.shape)}, expected {shape}"
            if not bool(torch.isfinite(tensor).all()):
                return f"'{key}' has non-finite values"
            reply.modules[key] = tensor
        return None

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What the strategy carries from one round to the next (tensors and JSON values), for
        a checkpoint: the byte ledger, the rounds' metrics and the privacy state; subclasses
        add their own."""
        return {
            "ledger": self.ledger.state_dict(),
            "round_metrics": {str(r): dict(m) for r, m in self.round_metrics.items()},
            "dp": None if self.dp is None else {
                "clip_norm": self.dp.clip_norm, "accountant": self.dp.accountant.state_dict()},
            "local_accountant": None if self.local_accountant is None
            else self.local_accountant.state_dict(),
            "last_problem": getattr(self, "last_problem", None),
            "merged": None if self.merged is None else self.merged.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.ledger.load_state_dict(state["ledger"])
        self.round_metrics.clear()
        self.round_metrics.update({int(r): dict(m) for r, m in state["round_metrics"].items()})
        if self.dp is not None and state.get("dp") is not None:
            self.dp.clip_norm = float(state["dp"]["clip_norm"])
            self.dp.accountant.load_state_dict(state["dp"]["accountant"])
        if self.local_accountant is not None and state.get("local_accountant") is not None:
            self.local_accountant.load_state_dict(state["local_accountant"])
        if state.get("last_problem") is not None:
            self.last_problem = state["last_problem"]
        if self.merged is not None:
            self.merged.load_state_dict(state.get("merged"))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              *, first_round: int = 1) -> Result:
        """Flower's round loop; ``first_round > 1`` continues a resumed run at that round
        with ``initial_arrays`` the global weights after ``first_round - 1`` (the same calls
        in the same order as Flower's loop, without the initial evaluation)."""
        if first_round <= 1:
            return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                 train_config=train_config, evaluate_config=evaluate_config,
                                 evaluate_fn=evaluate_fn)
        log(INFO, "Resuming %s at round %d of %d", type(self).__name__, first_round, num_rounds)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(), initial_arrays
        result.arrays = arrays
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
            agg_arrays, agg_metrics = self.aggregate_train(rnd, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[rnd] = agg_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                timeout=timeout)
            agg_eval = self.aggregate_evaluate(rnd, replies)
            if agg_eval is not None:
                result.evaluate_metrics_clientapp[rnd] = agg_eval
            if evaluate_fn:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
        return result

    def round_metric_record(self, server_round: int) -> MetricRecord:
        """The round's aggregated train metrics as a MetricRecord."""
        return MetricRecord({k: v for k, v in self.round_metrics[server_round].items()
                             if math.isfinite(v)})
