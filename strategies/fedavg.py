"""Full-parameter federated fine-tuning (FPFT): FedAvg in fedrac's harness."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrac.settings.typed import Settings
from fedrac.wire.records import to_array_record, to_shared_state_dict
from strategies.base import FedracStrategy


class FedAvgFPFT(FedracStrategy):
    """Every client trains all weights; the server takes their weighted average.

    Rule: ``W <- sum_k p_k W_k`` with ``p_k`` proportional to ``num-examples``; under a
    robust ``aggregation`` rule ``W <- W + rule(W_k - W)`` (the rule acts on the updates).
    Every reply tensor must have the dtype of the global tensor it replaces.
    Under ``privacy=dp``: ``W <- W + private_mean(W_k - W)`` (:mod:`fedrac.privacy.dp`).
    Sends ``arrays`` (the full global weights, kind ``weights``) and ``config``
    with ``mode="full"``; expects back ``arrays`` with the same keys and shapes.
    """

    name = "fedavg"
    # strategy.* keys this method never reads: a sweep over them runs it once
    # (fedrac/settings/sweep.py)
    IGNORED_KEYS = ("rank", "alpha", "sketch", "train_factor", "resample_every", "download")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._global: ArrayRecord | None = None

    @classmethod
    def from_config(cls, settings: Settings, layers, **common: Any) -> FedAvgFPFT:
        """Build from the run's typed settings (``layers`` is unused by FPFT)."""
        return cls(**common)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the full global weights to this round's clients."""
        self._global = arrays
        nodes = self.sample_train_nodes(grid, server_round)
        content = RecordDict({"arrays": arrays,
                              "config": self.train_config(server_round, mode="full")})
        return self.make_messages(server_round, content, nodes, {"arrays": "weights"})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The global weights plus the aggregate of the clients' updates (their weighted
        average under ``aggregation=mean``)."""
        assert self._global is not None
        current = to_shared_state_dict(self._global)
        expected = {k: tuple(t.shape) for k, t in current.items()}
        valid = self.collect_replies(server_round, replies, "arrays", expected,
                                     {"arrays": "weights"}, reference=current,
                                     dtypes={k: t.dtype for k, t in current.items()})
        metrics = self.round_metric_record(server_round)
        if not valid:
            return None, metrics
        return to_array_record(self.average(server_round, valid, current), release=True), \
            metrics
