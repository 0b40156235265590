"""Fed-RAC-LoRA: a fresh shared random sketch each round, one factor trained and averaged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrac.adapters import LayerSpec, resolve_trained
from fedrac.adapters.sketch import derive_seed, fingerprint, make_sketch
from fedrac.settings.typed import Settings
from fedrac.wire.delta_sync import SET_PREFIX, merge_factors
from fedrac.wire.records import array_to_tensor, to_array_record
from strategies.base import FedracStrategy, require_choice
from strategies.delta_sync import DOWNLOADS, DeltaSync, resolve_download

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
    ``A`` in even ones) or ``bernoulli`` (per round from the run seed, ``B`` with probability
    ``train_factor_p``, 0.5 by default).

    Heterogeneous ranks (``client_ranks``: a list of ranks ``<= rank``, one per partition
    id, or a shorter list of tiers given to contiguous blocks of partition ids, see
    :func:`clients.handlers.own_rank`): the sketch is drawn at ``rank``; a client of rank
    ``r_k`` trains against its first ``r_k`` rows (``A`` side) or columns (``B`` side) and
    uploads an ``r_k``-sized factor. The server zero-pads each reply to ``rank``, so each rank
    slice ``j`` is summed over the clients that have it with their weights ``p_k``, and the
    merge is exactly ``sum_k p_k s B_k A_{1:r_k}`` with ``s = alpha / rank`` for every client.

    Sends ``arrays`` (global weights), ``sketch`` (``seed``, ``distribution``,
    ``fingerprint``; kind ``seeds``) and ``config`` (client settings plus ``mode``,
    ``rank``, ``alpha``, ``train-factor``). Expects ``factors`` back.
    """

    name = "rac_lora"
    one_factor = True  # clients train one factor against a sketch: client.projected_step applies
    TRAIN_FACTORS = TRAIN_FACTORS
    DOWNLOADS = DOWNLOADS

    def __init__(
        self, *, layers: Mapping[str, LayerSpec], rank: int, alpha: float,
        sketch: str = "orthogonal", train_factor: str = "auto", resample_every: int = 1,
        download: str = "full", client_ranks: Sequence[int] | None = None,
        train_factor_p: float = 0.5, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        p = train_factor_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"strategy.train_factor_p={p!r} is not allowed; "
                             "allowed: a number in [0, 1]")
        self.train_factor_p = float(p)
        require_choice("strategy.train_factor", train_factor, TRAIN_FACTORS, "rac_lora")
        require_choice("strategy.download", download, DOWNLOADS)
        # ``auto`` (resolved from the whole config by ``from_config``) is full when built here
        if int(resample_every) < 1:
            raise ValueError(f"strategy.resample_every={resample_every!r} is not allowed; "
                             "allowed: an integer >= 1")
        self.set_adapters(layers, rank, alpha, sketch)
        self.client_ranks = self.check_client_ranks(client_ranks, self.rank)
        self.sync = DeltaSync() if download == "delta" else None
        self.train_factor = train_factor
        self.resample_every = int(resample_every)
        self._global: ArrayRecord | None = None
        self._plan: RoundPlan | None = None

    @classmethod
    def from_config(cls, settings: Settings, layers, **common: Any) -> RacLoRA:
        """Build from the run's typed settings."""
        s = settings.strategy
        return cls(layers=layers, rank=s.rank, alpha=s.alpha, sketch=s.sketch,
                   train_factor=s.train_factor,
                   resample_every=1 if s.resample_every is None else s.resample_every,
                   download=resolve_download(settings),
                   client_ranks=s.options.get("client_ranks"),
                   train_factor_p=s.options.get("train_factor_p", 0.5), **common)

    @staticmethod
    def check_client_ranks(value: Any, rank: int) -> tuple[int, ...] | None:
        """``strategy.client_ranks`` as a tuple of ints in ``1..rank`` (``None``: all ``rank``)."""
        if value is None:
            return None
        ok = isinstance(value, list | tuple) and len(value) > 0 and all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= rank for r in value)
        if not ok:
            raise ValueError(f"strategy.client_ranks={value!r} is not allowed; allowed: null or "
                             f"a non-empty list of ranks in 1..strategy.rank={rank} (one per "
                             "partition id, or tiers for contiguous blocks of them)")
        return tuple(int(r) for r in value)

    @classmethod
    def validate_config(cls, strategy_cfg: Mapping[str, Any]) -> None:
        """Check the keys only RAC-LoRA has."""
        cls.check_client_ranks(strategy_cfg.get("client_ranks"), int(strategy_cfg["rank"]))

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
        if self.train_factor == "bernoulli":  # B with probability train_factor_p
            u = derive_seed(self.run_seed, server_round, SIDE_STREAM) / 2.0 ** 63
            return "B" if u < self.train_factor_p else "A"
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
        if self.client_ranks is not None:
            content["config"]["client-ranks"] = list(self.client_ranks)
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
        current, valid, metrics = self.collect_factor_replies(server_round, replies, expected,
                                                              KINDS)
        if not valid:
            return None, metrics
        avg = self.average(server_round, valid)  # replies of rank r_k < rank come zero-padded
        sketches = {k: v for k, v in plan.sketches.items() if k not in avg}
        state = merge_factors(current, self.layers, avg, sketches, self.scale)
        if self.merged is not None:  # the merge s * B @ A, kept low-rank for the export
            both = {**sketches, **avg}
            self.merged.add_all({n: (both[f"{n}.lora_B"].to(torch.float64) * self.scale,
                                     both[f"{n}.lora_A"]) for n in self.layers})
        state = self.apply_modules(server_round, state, valid)
        if self.sync is not None:  # the round's change: factors, then the modules' new values
            self.sync.record(server_round, plan.seed, {
                **avg, **{SET_PREFIX + k: state[k] for k in self.module_shapes}})
        return to_array_record(state, release=True), metrics

    def _check_reply(self, msg: Message, array_key: str, expected: Mapping[str, tuple[int, ...]],
                     dtypes: Mapping[str, torch.dtype] | None = None):
        """The base checks at the reply's own rank ``r_k`` (one of ``client_ranks``, the same
        for every layer), then each factor zero-padded to ``rank`` (heterogeneous ranks)."""
        if self.client_ranks is None or array_key not in msg.content or \
                not isinstance(msg.content[array_key], ArrayRecord):
            return FedracStrategy._check_reply(msg, array_key, expected, dtypes)
        assert self._plan is not None
        record = msg.content[array_key]
        first = next(iter(expected))
        side = first.rpartition(".lora_")[2]
        try:
            shape = tuple(array_to_tensor(record[first]).shape) if first in record.keys() else ()
        except Exception:  # noqa: BLE001 - the base check names the undecodable key
            shape = ()
        r_k = (shape[0] if side == "A" else shape[1]) if len(shape) == 2 else self.rank
        if r_k not in self.client_ranks:
            return (f"rank {r_k} of '{first}' is not one of strategy.client_ranks "
                    f"{sorted(set(self.client_ranks))}"), None
        own = {key: self.layers[key.rpartition(".lora_")[0]].factor_shape(
            key.rpartition(".lora_")[2], r_k) for key in expected}
        reason, reply = FedracStrategy._check_reply(msg, array_key, own, dtypes)
        if reason is None and r_k < self.rank:
            reply.tensors = {key: pad_rank(t, expected[key], key.rpartition(".lora_")[2])
                             for key, t in reply.tensors.items()}
        return reason, reply


def pad_rank(factor: torch.Tensor, shape: tuple[int, ...], side: str) -> torch.Tensor:
    """A rank-``r_k`` factor zero-padded to ``shape`` (rank ``r``): rows of ``A``, columns of
    ``B``; ``s B_pad A = s B A_{1:r_k}``."""
    out = torch.zeros(shape, dtype=factor.dtype)
    if side == "A":
        out[: factor.shape[0]] = factor
    else:
        out[:, : factor.shape[1]] = factor
    return out
