"""Secure aggregation: fedrac's strategies inside Flower's SecAgg+ workflow (``secagg=plus``).

Flower 1.41 ships SecAgg+ only for its legacy API: ``SecAggPlusWorkflow`` needs a
``LegacyContext`` and a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit`` with
``FitIns`` / ``FitRes``), and ``secaggplus_mod`` reads the client's reply as a ``FitRes``
(one flat list of arrays, ``num_examples``). fedrac's strategies speak the message API with
several records per message. This module bridges the two without touching the protocol:

- :class:`LegacyAdapter` is a legacy ``Strategy`` around a fedrac strategy: ``configure_fit``
  runs the strategy's ``configure_train`` and keeps each node's message content;
  ``aggregate_fit`` receives the one unmasked aggregate and hands the strategy one reply per
  surviving client, all carrying that aggregate, so the strategy's own rule (and its checks,
  train-loss bookkeeping and, under ``privacy=dp``, its noise) runs unchanged.
- :class:`FedracSecAggPlusWorkflow` is Flower's workflow with one change: stage 2 sends the
  strategy's own message content (weights, sketch seed, config ...) instead of the ``FitIns``
  conversion; all cryptography (key agreement, Shamir shares, masks, unmasking) is Flower's.
- :func:`run_secagg` runs the rounds (the loop of Flower's ``Strategy.start``).

The clients' side is :mod:`clients.secagg`. SecAgg+ sums integers: each client multiplies its
reply by ``num_examples / max_weight`` (quantised), clips every entry to ``[-clipping_range,
clipping_range]`` and rounds it stochastically to one of ``quantization_range`` levels; the
server gets the weighted average. Only strategies whose rule is linear in one average of the
replies fit: ``fedavg``, ``rac_lora``, ``ffa_lora``, ``fedit``, ``cola``. FedEx-LoRA's
residual and FLoRA's stack need every client's own factors, which SecAgg+ exists to hide.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedrac.server.checkpoint import STOP, RunInterrupted
from fedrac.wire.ledger import ByteLedger, record_dict_nbytes
from fedrac.wire.records import numpy_to_array

LINEAR_STRATEGIES = ("fedavg", "rac_lora", "ffa_lora", "fedit", "cola", "fed_sb")
RECORD_KEY = "secagg-record"  # fitres.metrics entries naming the reply's ArrayRecord
KEYS_KEY = "secagg-keys"
DTYPES_KEY = "secagg-dtypes"
SECAGG_KINDS = {"secaggplus_configs": "secagg", "fitres.parameters": "secagg",
                "fitres.metrics": "metrics", "fitres.num_examples": "metrics",
                "fitres.status": "config"}


def check_config(cfg: Mapping[str, Any]) -> None:
    """Check the ``secagg`` group against the run (``ValueError``: one line)."""
    sa = dict(cfg.get("secagg") or {})
    if sa.get("name", "none") in (None, "none"):
        return
    if sa["name"] != "plus":
        raise ValueError(f"secagg={sa['name']!r} is not allowed; allowed: none, plus")
    name = cfg["strategy"]["name"]
    if name not in LINEAR_STRATEGIES:
        raise ValueError(f"secagg=plus is not allowed for strategy {name} (its rule needs every "
                         "client's own factors, which secure aggregation hides); allowed: "
                         f"{', '.join(LINEAR_STRATEGIES)}")
    agg = dict(cfg.get("aggregation") or {})
    if agg.get("name", "mean") != "mean":
        raise ValueError(f"aggregation={agg['name']} is not allowed with secagg=plus (the "
                         "server sees only the masked sum, so a robust rule has no updates to "
                         "act on); allowed: aggregation=mean")
    if agg.get("max_update_norm") not in (None, "default"):
        raise ValueError(f"aggregation.max_update_norm={agg['max_update_norm']!r} is not "
                         "allowed with secagg=plus (the server never sees one client's "
                         "update); allowed: null (bound updates with privacy=dp, which the "
                         "clients clip)")
    model = dict(cfg.get("model") or {})
    if model.get("name") == "hf":
        raise ValueError("model=hf is not allowed with secagg=plus (its trained modules, e.g. "
                         "the new head, travel beside the factors and are not summed by "
                         "SecAgg+); allowed: a built-in model")
    if cfg["strategy"].get("download", "full") == "delta":  # ``auto`` resolves to full
        raise ValueError("strategy.download=delta is not allowed with secagg=plus (a resync "
                         "reply cannot go through the masked sum); allowed: full, auto")
    p = cfg.get("privacy") or {}
    if p.get("mode") == "dp" and p.get("clipping", "fixed") != "fixed":
        raise ValueError("privacy.clipping=adaptive is not allowed with secagg=plus (the "
                         "server never sees a norm); allowed: fixed (clients clip)")
    for key, ok, allowed in (
        ("clipping_range", _pos(sa.get("clipping_range")), "a number > 0"),
        ("max_weight", _pos(sa.get("max_weight")), "a number > 0"),
        ("quantization_range", _int(sa.get("quantization_range"), 2), "an integer >= 2"),
        ("modulus_range", _int(sa.get("modulus_range"), 2)
         and bin(sa["modulus_range"]).count("1") == 1
         and sa["modulus_range"] > sa.get("quantization_range", 0)
         and sa["modulus_range"] <= 2 ** 32,
         "a power of 2 above quantization_range, at most 2**32"),
        ("num_shares", _share(sa.get("num_shares")), "a fraction in (0, 1] or an integer > 2"),
        ("reconstruction_threshold", _share(sa.get("reconstruction_threshold")),
         "a fraction in (0, 1] or an integer >= 2"),
    ):
        if not ok:
            raise ValueError(f"secagg.{key}={sa.get(key)!r} is not allowed; allowed: {allowed}")
    cohort = max(int(int(cfg["num_clients"]) * float(cfg["fraction_train"])), 1)
    if cohort < 2:
        raise ValueError(f"secagg=plus needs at least 2 clients per round, got {cohort} "
                         "(num_clients * fraction_train); allowed: >= 2")


def _pos(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _share(v: Any) -> bool:
    return (isinstance(v, float) and 0 < v <= 1) or _int(v, 2)


def error_bound(num_examples: Sequence[float], sa: Mapping[str, Any]) -> float:
    """Worst-case error per entry of SecAgg+'s weighted average from quantisation.

    Client k sends ``round_stochastic((r_k x + c) Q / 2c)`` with ``r_k = q_k / Q`` its
    quantised weight (``q_k = round(Q * n_k / max_weight)``); each rounding is off by less than
    one level ``2c / Q``, and the server divides the sum by ``sum_k r_k``. So
    ``|error| < K * (2c / Q) / sum_k r_k`` (unbiased; its std is at most half that over
    ``sqrt(K)``). Entries with ``|r_k x| > c`` are clipped instead (not bounded here)."""
    c, q = float(sa["clipping_range"]), int(sa["quantization_range"])
    ratios = [round(q * float(n) / float(sa["max_weight"])) / q for n in num_examples]
    return len(ratios) * (2 * c / q) / sum(ratios)


class _Proxy:
    """The ``ClientProxy`` stand-in the legacy workflow needs: it only reads ``node_id``."""

    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = int(node_id), str(node_id)


class LegacyAdapter:
    """A legacy ``flwr.server.strategy.Strategy`` that drives a fedrac (message API) strategy.

    Duck-typed: the SecAgg+ workflow calls only ``configure_fit`` and ``aggregate_fit``.
    """

    def __init__(self, strategy, grid: Grid, dp_weights: bool) -> None:
        self.strategy, self.grid, self.dp_weights = strategy, grid, dp_weights
        self.arrays: ArrayRecord | None = None
        self.contents: dict[int, RecordDict] = {}
        self.metrics: MetricRecord | None = None
        self.num_examples: list[float] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        """The strategy's ``configure_train``; keeps each node's content for stage 2."""
        from flwr.common import FitIns, Parameters

        assert self.arrays is not None
        with _ledger_off(self.strategy):
            messages = list(self.strategy.configure_train(server_round, self.arrays,
                                                          ConfigRecord(), self.grid))
        # one container per node: the workflow adds each node's own secagg record to it
        self.contents = {int(m.metadata.dst_node_id): RecordDict(dict(m.content.items()))
                         for m in messages}
        self._sent = {int(m.metadata.dst_node_id): m for m in messages}
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.contents]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        """Hand the strategy one reply per surviving client, each carrying the aggregate."""
        from flwr.common import parameters_to_ndarrays

        self.strategy.sent.pop(server_round, None)  # replies are rebuilt: no message ids
        if failures:
            log(WARNING, "round %d: %d SecAgg+ failures (dropped clients)", server_round,
                len(failures))
        replies, self.num_examples = [], []
        for proxy, fitres in results:
            meta = dict(fitres.metrics)
            keys = json.loads(str(meta.pop(KEYS_KEY)))
            dtypes = json.loads(str(meta.pop(DTYPES_KEY)))
            record_name = str(meta.pop(RECORD_KEY))
            arrays = parameters_to_ndarrays(fitres.parameters)
            record = ArrayRecord({k: numpy_to_array(np.ascontiguousarray(a, dtype=np.dtype(d)))
                                  for k, a, d in zip(keys, arrays, dtypes, strict=True)})
            self.num_examples.append(float(fitres.num_examples))
            content = RecordDict({record_name: record, "metrics": MetricRecord(
                {k: v for k, v in meta.items() if isinstance(v, int | float)})})
            replies.append(Message(content, reply_to=self._sent[proxy.node_id]))
        with _ledger_off(self.strategy):
            arrays, self.metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return None, {}


class _ledger_off:
    """Inside the block the strategy's ledger is a throwaway one (SecAgg bytes are metered
    at the grid instead: every stage's real messages)."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __enter__(self) -> None:
        self.real, self.strategy.ledger = self.strategy.ledger, ByteLedger()

    def __exit__(self, *exc: Any) -> None:
        self.strategy.ledger = self.real


class MeteredGrid(Grid):
    """A ``Grid`` that adds the bytes of every message it carries to a ledger."""

    def __init__(self, grid: Grid, ledger: ByteLedger, kinds: Mapping[str, str]) -> None:
        self.grid, self.ledger, self.kinds = grid, ledger, dict(kinds)
        self.server_round = 0

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:
            self.ledger.add(self.server_round, "down", record_dict_nbytes(m.content, self.kinds))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if not r.has_error():
                self.ledger.add(self.server_round, "up", record_dict_nbytes(r.content, self.kinds))
        return replies

    def __getattr__(self, name: str) -> Any:  # run, get_node_ids, push/pull ... as the grid's
        return getattr(self.grid, name)

    # the abstract methods of Grid, forwarded
    @property
    def run(self):  # type: ignore[override]
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


def _workflow_class():
    from flwr.server.workflow import SecAggPlusWorkflow

    class FedracSecAggPlusWorkflow(SecAggPlusWorkflow):
        """Flower's SecAgg+ workflow; stage 2 carries the fedrac strategy's own content."""

        adapter: LegacyAdapter

        def setup_stage(self, grid, context, state) -> bool:
            ok = super().setup_stage(grid, context, state)
            state.nid_to_fitins = {nid: self.adapter.contents[nid]
                                   for nid in state.nid_to_fitins}
            return ok

    return FedracSecAggPlusWorkflow


def run_secagg(
    strategy, grid: Grid, initial: ArrayRecord, num_rounds: int, timeout: float,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], sa: Mapping[str, Any],
) -> dict[str, Any]:
    """Run ``num_rounds`` of ``strategy`` with every reply summed by SecAgg+.

    Returns per-round SecAgg figures: seconds and the worst-case quantisation error bound.
    """
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    dp_weights = strategy.privacy.central
    kinds = {"arrays": "weights", "adapters": "factors", "factors": "factors",
             "sketch": "seeds", "config": "config", **getattr(strategy, "kinds", {}),
             **SECAGG_KINDS}
    metered = MeteredGrid(grid, strategy.ledger, kinds)
    adapter = LegacyAdapter(strategy, metered, dp_weights)
    adapter.arrays = initial
    workflow = _workflow_class()(
        float(sa["num_shares"]) if isinstance(sa["num_shares"], float) else int(sa["num_shares"]),
        float(sa["reconstruction_threshold"]) if isinstance(sa["reconstruction_threshold"], float)
        else int(sa["reconstruction_threshold"]),
        max_weight=float(sa["max_weight"]), clipping_range=float(sa["clipping_range"]),
        quantization_range=int(sa["quantization_range"]),
        modulus_range=int(sa["modulus_range"]), timeout=timeout)
    workflow.adapter = adapter
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), config=ServerConfig(num_rounds=num_rounds),
                            strategy=adapter)  # type: ignore[arg-type]
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    log(INFO, "secagg: SecAgg+ (Flower's legacy workflow), clipping range %g, %d levels",
        float(sa["clipping_range"]), int(sa["quantization_range"]))
    evaluate_fn(0, initial)
    stats: dict[str, Any] = {"rounds": []}
    for server_round in range(1, num_rounds + 1):
        metered.server_round = server_round
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()})
        start = time.perf_counter()
        workflow(metered, context)
        seconds = time.perf_counter() - start
        bound = error_bound(adapter.num_examples, sa) if adapter.num_examples else math.nan
        stats["rounds"].append({"round": server_round, "seconds": seconds,
                                "error_bound": bound, "clients": len(adapter.num_examples)})
        if server_round not in strategy.round_metrics:  # SecAgg halted: nothing aggregated
            strategy.round_metrics[server_round] = {"clients": 0.0}
        strategy.round_metrics[server_round]["secagg_error_bound"] = bound
        evaluate_fn(server_round, adapter.arrays)
        if STOP.requested and server_round < num_rounds:  # SIGINT / SIGTERM: stop here
            raise RunInterrupted(server_round, STOP.signum)
    return stats
