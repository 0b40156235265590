"""Server side of ``strategy.download=delta``: per-round deltas, per-node versions, resyncs.

The server remembers, for every node, the version of the global weights it last sent (``W_v``,
the weights after round ``v``) and, for recent rounds, each round's change (its seed and the
tensors :func:`fedrac.wire.delta_sync.apply_change` replays). A node that comes back at round ``t``
gets the deltas of rounds ``v+1 .. t-1`` and a checksum of ``W_{t-1}`` instead of the weights
-- unless it is new, its earlier reply failed, the history no longer reaches back to ``v``, or
the deltas would cost more bytes than the weights: then it gets the full weights. A node whose
rebuild fails (cache missing or corrupt, checksum mismatch) answers ``resync``; it is sent the
full weights at once, in the same round, so the run's result does not change.
See :mod:`fedrac.wire.delta_sync` for the wire format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedrac.settings.typed import Settings
from fedrac.wire.delta_sync import sync_checksum
from fedrac.wire.ledger import array_record_nbytes, record_dict_nbytes
from fedrac.wire.records import to_array_record, to_shared_state_dict

DOWNLOADS = ("auto", "full", "delta")  # strategy.download of the adapter methods
RESYNC_KEY = "resync"  # a client's reply record asking for the full weights


def resolve_download(settings: Settings) -> str:
    """``strategy.download`` with ``auto`` resolved: ``delta`` for ``model=hf`` (a node holds
    the base and receives what changed), ``full`` for the built-in models and under
    ``secagg=plus`` (a resync cannot go through the masked sum)."""
    value = str(settings.strategy.download or "full")
    if value != "auto":
        return value
    secagg = settings.privacy.secagg == "plus"
    return "delta" if settings.model.name == "hf" and not secagg else "full"


class DeltaSync:
    """Builds each node's download (deltas or full weights) and serves resync requests."""

    def __init__(self) -> None:
        self.history: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}  # round -> seed, avg
        self.node_version: dict[int, int] = {}
        self.node_config: dict[int, dict] = {}  # the train config each node cached (last full)
        self.complete_since = 1  # every merge from this round on is in ``history``
        self.grid: Grid | None = None
        self.timeout: float = 3600.0
        self._full: RecordDict | None = None

    def record(self, server_round: int, seed: int, factors: Mapping[str, torch.Tensor]) -> None:
        """Remember round ``server_round``'s change: its seed and the tensors
        :func:`fedrac.wire.delta_sync.apply_change` replays (averaged trained factors, an update
        record, ``set:<key>`` values of the trained modules)."""
        self.history[server_round] = (int(seed), {k: v.detach().cpu() for k, v in
                                                  factors.items()})

    def state_dict(self) -> dict[str, Any]:
        """The history and every node's version and cached config, for a checkpoint."""
        return {"history": {str(r): {"seed": seed, "factors": f}
                            for r, (seed, f) in self.history.items()},
                "node_version": {str(n): v for n, v in self.node_version.items()},
                "node_config": {str(n): c for n, c in self.node_config.items()},
                "complete_since": self.complete_since}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.history = {int(r): (int(h["seed"]), dict(h["factors"]))
                        for r, h in state["history"].items()}
        self.node_version = {int(n): int(v) for n, v in state["node_version"].items()}
        self.node_config = {int(n): dict(c) for n, c in state["node_config"].items()}
        self.complete_since = int(state["complete_since"])

    def _prune(self, full_bytes: int) -> None:
        """Drop rounds so old that replaying them would cost more than the weights."""
        kept, total = [], 0
        for rnd in sorted(self.history, reverse=True):
            total += sum(t.numel() * t.element_size() for t in self.history[rnd][1].values())
            if total > full_bytes:
                break
            kept.append(rnd)
        dropped = [r for r in self.history if r not in kept]
        if dropped:
            self.complete_since = max(self.complete_since, max(dropped) + 1)
        self.history = {r: self.history[r] for r in kept}

    def downloads(
        self, server_round: int, arrays: ArrayRecord, node_ids: Iterable[int],
        common: Mapping[str, ConfigRecord],
    ) -> dict[int, RecordDict]:
        """Per node: the ``common`` records plus ``deltas`` or ``arrays``, and ``sync``."""
        target = server_round - 1
        full_bytes = array_record_nbytes(arrays)
        self._prune(full_bytes)
        config = dict(common["config"])
        checksum = sync_checksum(to_shared_state_dict(arrays), config)  # weights and train config
        self._full = RecordDict({"arrays": arrays, "sync": ConfigRecord(
            {"target": target, "checksum": checksum}), **common})
        by_key: dict[tuple, RecordDict | None] = {}
        out: dict[int, RecordDict] = {}
        for node in node_ids:
            base, content = self.node_version.get(node), None
            if base is not None:
                cached = self.node_config.get(node, {})
                changed = {k: v for k, v in config.items()
                           if k == "server-round" or cached.get(k) != v}
                key = (base, repr(sorted(changed.items())))
                if key not in by_key:
                    by_key[key] = self._delta_content(base, target, checksum, full_bytes,
                                                      common, changed)
                content = by_key[key]
            if content is None:
                content = self._full
                self.node_config[node] = config
            out[node] = content
            self.node_version[node] = target
        return out

    def _delta_content(
        self, base: int, target: int, checksum: str, full_bytes: int,
        common: Mapping[str, ConfigRecord], changed: Mapping,
    ) -> RecordDict | None:
        """The delta download from ``W_base`` to ``W_target``; ``None`` when full is better."""
        if base > target or base + 1 < self.complete_since:
            return None
        merged = [r for r in range(base + 1, target + 1) if r in self.history]
        deltas = to_array_record({f"{r}/{k}": t for r in merged
                              for k, t in self.history[r][1].items()})
        if array_record_nbytes(deltas) >= full_bytes:
            return None
        sync = ConfigRecord({"base": base, "rounds": merged,
                             "seeds": [self.history[r][0] for r in merged],
                             "checksum": checksum})
        # the node cached the rest of the config with its last full weights
        slim = {**common, "config": ConfigRecord(dict(changed))}
        return RecordDict({"deltas": deltas, "sync": sync, **slim})

    def forget_failed(self, replies: list[Message]) -> None:
        """Nodes whose reply is an error may not hold what was sent: send them full next time."""
        for msg in replies:
            if msg.has_error():
                self.node_version.pop(msg.metadata.src_node_id, None)

    def resolve_resyncs(
        self, server_round: int, replies: Iterable[Message],
        make_messages: Callable[[int, Mapping[int, RecordDict], list[int]], list[Message]],
        ledger_add: Callable[[int, str, dict[str, int]], None],
    ) -> list[Message]:
        """Replace resync requests by the replies to a full-weights message sent right away."""
        replies = list(replies)
        self.forget_failed(replies)
        asking = [m for m in replies if not m.has_error() and RESYNC_KEY in m.content]
        if not asking:
            return replies
        assert self.grid is not None and self._full is not None
        nodes = [m.metadata.src_node_id for m in asking]
        for msg in asking:
            ledger_add(server_round, "up", record_dict_nbytes(msg.content, {RESYNC_KEY: "config"}))
            log(WARNING, "round %d: node %d resyncs with full weights: %s", server_round,
                msg.metadata.src_node_id, msg.content[RESYNC_KEY].get("reason", "?"))
        for node in nodes:
            self.node_config[node] = dict(self._full["config"])
        messages = make_messages(server_round, {n: self._full for n in nodes}, nodes)
        again = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        self.forget_failed(again)
        return [m for m in replies if m not in asking] + again
