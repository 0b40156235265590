"""The byte ledger: bytes that messages really carried, per round, direction and kind.

Sizes are measured from the records (the serialized bytes each ``Array`` holds and
the protobuf size of each ``ConfigRecord`` / ``MetricRecord``), not from a formula.
"""

from __future__ import annotations

from collections import defaultdict

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import config_record_to_proto, metric_record_to_proto

DIRECTIONS = ("up", "down")


def array_record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays in ``record``."""
    return sum(len(arr.data) for arr in record.values())


def record_dict_nbytes(content: RecordDict, kinds: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes per kind of one message's content.

    ``kinds`` maps a record's key to its kind (e.g. ``"arrays" -> "weights"``);
    unnamed ArrayRecords count as ``arrays``, config and metric records as ``config``
    and ``metrics``.
    """
    kinds = kinds or {}
    out: dict[str, int] = defaultdict(int)
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            out[kinds.get(key, "arrays")] += array_record_nbytes(record)
        elif isinstance(record, ConfigRecord):
            out[kinds.get(key, "config")] += config_record_to_proto(record).ByteSize()
        elif isinstance(record, MetricRecord):
            out[kinds.get(key, "metrics")] += metric_record_to_proto(record).ByteSize()
    return dict(out)


class ByteLedger:
    """Accumulates bytes per round, direction (``up``/``down``) and kind."""

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, dict[str, int]]] = defaultdict(
            lambda: {d: defaultdict(int) for d in DIRECTIONS}
        )

    def add(self, server_round: int, direction: str, by_kind: dict[str, int]) -> None:
        """Add one message's bytes (``by_kind``) to the round's tally."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r}; allowed: up, down")
        for kind, n in by_kind.items():
            self._rounds[server_round][direction][kind] += int(n)

    def round_kinds(self, server_round: int, direction: str) -> dict[str, int]:
        """Bytes per kind for one round and direction."""
        if server_round not in self._rounds:
            return {}
        return dict(self._rounds[server_round][direction])

    def round_total(self, server_round: int, direction: str) -> int:
        """Total bytes for one round and direction."""
        return sum(self.round_kinds(server_round, direction).values())

    def totals(self) -> dict[str, dict[str, int]]:
        """Bytes per direction and kind over all rounds."""
        out: dict[str, dict[str, int]] = {d: defaultdict(int) for d in DIRECTIONS}
        for per_dir in self._rounds.values():
            for d in DIRECTIONS:
                for kind, n in per_dir[d].items():
                    out[d][kind] += n
        return {d: dict(v) for d, v in out.items()}

    def state_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        """The tally as plain values (round keys as strings), for a checkpoint."""
        return {str(r): {d: dict(per_dir[d]) for d in DIRECTIONS}
                for r, per_dir in self._rounds.items()}

    def load_state_dict(self, state: dict[str, dict[str, dict[str, int]]]) -> None:
        """Replace the tally with :meth:`state_dict`'s."""
        self._rounds.clear()
        for r, per_dir in state.items():
            for d in DIRECTIONS:
                for kind, n in per_dir.get(d, {}).items():
                    self._rounds[int(r)][d][kind] = int(n)
