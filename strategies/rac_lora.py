"""Fed-RAC-LoRA: a fresh shared random sketch each round, one factor trained and averaged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrac.delta_sync import merge_factors
from fedrac.lora import LayerSpec, resolve_trained
from fedrac.records import to_array_record, to_shared_state_dict
from fedrac.sketch import derive_seed, fingerprint, make_sketch
from strategies.base import FedracStrategy, require_choice
from strategies.delta_sync import DOWNLOADS, DeltaSync

TRAIN_FACTORS = ("A", "B", "auto", "alternate", "bernoulli")
SIDE_STREAM = 3  # derive_seed(run_seed, round, SIDE_STREAM) flips the coin of `bernoulli`
KINDS = {"arrays": "weights", "factors": "factors", "sketch": "seeds", "config": "config",
         "deltas": "deltas", "sync": "seeds"}


@dataclass(frozen=True)
class RoundPlan:
    """What one round trains: the seed, the trained side per layer and the sketches."""

    seed: int
    trained: dict[str, str]
    sketches: dict[str, torch.Tensor]

    def factor_key(self, layer: str) -> str:
        return f"{layer}.lora_{self.trained[layer]}"


def plan_round(
    layers: Mapping[str, LayerSpec], seed: int, rank: int, distribution: str, train_factor: str
) -> RoundPlan:
    """The round's trained sides and sketches (the same on the server and every client)."""
    trained = {n: resolve_trained(spec, train_factor) for n, spec in layers.items()}
    sketches = {}
    for name, spec in layers.items():
        other = "B" if trained[name] == "A" else "A"
        key = f"{name}.lora_{other}"
        sketches[key] = make_sketch(seed, key, spec.factor_shape(other, rank), distribution)
    return RoundPlan(seed, trained, sketches)


class RacLoRA(FedracStrategy):
    """Randomized Asymmetric Chain of LoRA (arXiv 2410.08305), federated.

    Round ``t``: ``seed_t = derive_seed(run_seed, t)``; per target layer a sketch
    (the factor not trained, drawn from ``seed_t``) is frozen and the other factor
    starts at zero. Clients return only the trained factors; the server merges
    ``W <- W + s * B_bar @ A_t`` (or ``s * B_t @ A_bar``), ``s = alpha / rank``,
    with ``B_bar = sum_k p_k B_k`` -- exact, because the sketch is shared. Under a robust
    ``aggregation`` rule ``B_bar = rule(B_k)`` (the trained factor is the update: it starts
    at zero), merged as exactly: every client's ``s B_k A_t`` lies in the one subspace the
    shared sketch spans, and the rule picks one point of it.
    Under ``privacy=dp`` ``B_bar`` is the private mean of the ``B_k``; its noise lies in the
    factor's space, so the merge stays exact.
    ``resample_every=k`` keeps a sketch for k rounds; k beyond the run length is
    asymmetric LoRA (FFA-LoRA), confined to one subspace. ``train_factor``: ``A``,
    ``B``, ``auto`` (the smaller factor per layer), ``alternate`` (``B`` in odd rounds,
    ``A`` in even ones) or ``bernoulli`` (a fair coin per round from the run seed).

    Sends ``arrays`` (global weights), ``sketch`` (``seed``, ``distribution``,
    ``fingerprint``; kind ``seeds``) and ``config`` (client settings plus ``mode``,
    ``rank``, ``alpha``, ``train-factor``). Expects ``factors`` back.
    """

    name = "rac_lora"
    TRAIN_FACTORS = TRAIN_FACTORS
    DOWNLOADS = DOWNLOADS

    def __init__(
        self, *, layers: Mapping[str, LayerSpec], rank: int, alpha: float,
        sketch: str = "orthogonal", train_factor: str = "auto", resample_every: int = 1,
        download: str = "full", **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_choice("strategy.train_factor", train_factor, TRAIN_FACTORS, "rac_lora")
        require_choice("strategy.download", download, DOWNLOADS)
        if int(resample_every) < 1:
            raise ValueError(f"strategy.resample_every={resample_every!r} is not allowed; "
                             "allowed: an integer >= 1")
        self.set_adapters(layers, rank, alpha, sketch)
        self.sync = DeltaSync() if download == "delta" else None
        self.train_factor = train_factor
        self.resample_every = int(resample_every)
        self._global: ArrayRecord | None = None
        self._plan: RoundPlan | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], layers, **common: Any) -> RacLoRA:
        """Build from the composed run config."""
        s = cfg["strategy"]
        return cls(layers=layers, rank=s["rank"], alpha=s["alpha"], sketch=s["sketch"],
                   train_factor=s["train_factor"], resample_every=s.get("resample_every", 1),
                   download=s.get("download", "full"), **common)

    def state_dict(self) -> dict[str, Any]:
        """Base state plus the delta-sync state (``download=delta``)."""
        return {**super().state_dict(),
                "sync": None if self.sync is None else self.sync.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        if self.sync is not None:
            self.sync.load_state_dict(state["sync"])

    def round_seed(self, server_round: int) -> int:
        """The sketch seed of a round: a new one every ``resample_every`` rounds."""
        first = (server_round - 1) // self.resample_every * self.resample_every + 1
        return derive_seed(self.run_seed, first)

    def round_side(self, server_round: int) -> str:
        """The ``train-factor`` clients get this round (``alternate``/``bernoulli`` resolved)."""
        if self.train_factor == "alternate":
            return "B" if server_round % 2 else "A"
        if self.train_factor == "bernoulli":
            return "AB"[derive_seed(self.run_seed, server_round, SIDE_STREAM) % 2]
        return self.train_factor

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the weights, the round's seed and fingerprint, and the settings."""
        self._global = arrays
        side = self.round_side(server_round)
        self._plan = plan_round(self.layers, self.round_seed(server_round), self.rank,
                                self.sketch, side)
        nodes = self.sample_train_nodes(grid, server_round)
        content = RecordDict({
            "arrays": arrays,
            "sketch": ConfigRecord({"seed": self._plan.seed, "distribution": self.sketch,
                                    "fingerprint": fingerprint(self._plan.sketches)}),
            "config": self.train_config(server_round, mode="adapters", rank=self.rank,
                                        alpha=self.alpha, **{"train-factor": side}),
        })
        if self.sync is not None:  # download=delta: per node, deltas or full weights
            self.sync.grid = grid
            del content["arrays"]
            content["config"]["download"] = "delta"
            contents = self.sync.downloads(server_round, arrays, nodes, dict(content.items()))
            return self.make_messages(server_round, contents, nodes, KINDS)
        return self.make_messages(server_round, content, nodes, KINDS)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the trained factors and merge ``s * B @ A`` into the global weights."""
        assert self._global is not None and self._plan is not None
        plan = self._plan
        expected = {plan.factor_key(n): spec.factor_shape(plan.trained[n], self.rank)
                    for n, spec in self.layers.items()}
        if self.sync is not None:
            replies = self.sync.resolve_resyncs(
                server_round, replies,
                lambda rnd, contents, nodes: self.make_messages(rnd, contents, nodes, KINDS),
                self.ledger.add)
        current = to_shared_state_dict(self._global)
        valid = self.collect_replies(server_round, replies, "factors", expected, KINDS,
                                     dtypes=self.factor_dtypes(current, expected))
        metrics = self.round_metric_record(server_round)
        if not valid:
            return None, metrics
        avg = self.average(server_round, valid)
        sketches = {k: v for k, v in plan.sketches.items() if k not in avg}
        state = merge_factors(current, self.layers, avg, sketches, self.scale)
        state = self.apply_modules(server_round, state, valid)
        if self.sync is not None:
            self.sync.record(server_round, plan.seed, avg)
        return to_array_record(state), metrics
