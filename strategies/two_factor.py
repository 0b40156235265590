"""Shared plumbing of the methods that train both LoRA factors (FedIT, COLA, FedEx-LoRA, FLoRA).

The server keeps the frozen base weights and, for the methods whose adapters persist across
rounds, the global factors ``(A, B)``. Each round clients receive the base weights
(``arrays``), either the global factors (``adapters``, kind ``factors``) or, when they start
fresh, the seed of the random factor (``sketch``, kind ``seeds``), and optionally the server's
last merge as an ``update`` record. They train both factors and reply with both. With
``strategy.download=delta`` (the default on ``model=hf``) a node that holds the base weights
gets, instead of ``arrays`` and ``update``, the changes of the base since it last had it
(:class:`strategies.delta_sync.DeltaSync`): nothing for FedIT, the merged low-rank product for
COLA and FLoRA, FedEx-LoRA's residual (low-rank where it is), the new values of the trained
modules -- plus the global adapters, as in every round. The server merges into its base with
the clients' own function (:func:`fedrac.wire.delta_sync.apply_update`) on the very record it sends,
so a client's base is the server's, bit for bit, whichever way it was downloaded. Subclasses
say how the replies are combined (:meth:`TwoFactorLoRA.combine`); the aggregation rule acts on
each factor's update, i.e. the factor minus the one the client started from
(:meth:`TwoFactorLoRA.start_factors`). Under
``privacy=dp`` those updates are clipped jointly and noised (:mod:`fedrac.privacy.dp`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrac.adapters import LayerSpec
from fedrac.adapters.sketch import derive_seed, fingerprint, make_sketch
from fedrac.models.merged_factors import MergedFactors
from fedrac.settings.typed import Settings
from fedrac.wire.delta_sync import SET_PREFIX, apply_update
from fedrac.wire.records import to_array_record, to_state_dict
from strategies.base import FedracStrategy, ValidReply, require_choice
from strategies.delta_sync import DOWNLOADS, DeltaSync, resolve_download

ZERO_SIDES = ("both", "A", "B")
FRESH_STREAM = 4  # derive_seed(run_seed, round, FRESH_STREAM) draws fresh random factors


def lora_product(
    a: torch.Tensor, b: torch.Tensor, scale: float, spec: LayerSpec
) -> torch.Tensor:
    """``scale * B @ A`` in float64, shaped like the layer's weight."""
    return spec.delta(a.to(torch.float64), b.to(torch.float64), scale)


class TwoFactorLoRA(FedracStrategy):
    """Base of the two-factor methods; ``train_factor`` names the factor that starts at zero.

    ``train_factor``: ``both`` (PEFT's init: ``B = 0``, ``A`` random) or ``A`` / ``B``
    (that factor starts at zero, the other random; both are trained) -- the paper's
    two orientations. Sends ``config`` with ``mode="adapters"``, ``rank``, ``alpha``,
    ``train-factor="both"`` and ``zero-factor``.
    """

    TRAIN_FACTORS = ZERO_SIDES
    DOWNLOADS = DOWNLOADS
    IGNORED_KEYS = ("resample_every",)  # no sketch to resample: a sweep over it runs once
    update_kind = "factors"
    trains_both = True  # clients train A and B: client.refactor (RefLoRA) applies

    def __init__(
        self, *, layers: Mapping[str, LayerSpec], rank: int, alpha: float,
        sketch: str = "orthogonal", train_factor: str = "both", download: str = "full",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_choice("strategy.train_factor", train_factor, ZERO_SIDES, self.name)
        require_choice("strategy.download", download, DOWNLOADS)
        self.sync = DeltaSync() if download == "delta" else None
        self.set_adapters(layers, rank, alpha, sketch)
        self.zero_side = "B" if train_factor == "both" else train_factor
        self.base: dict[str, torch.Tensor] | None = None
        self.adapters: dict[str, torch.Tensor] | None = None  # None: clients start fresh
        self.sent_base: dict[str, torch.Tensor] | None = None  # base before `update`
        self.update: dict[str, torch.Tensor] | None = None
        self.round_start: dict[str, torch.Tensor] | None = None  # this round's start factors
        self.change: dict[str, torch.Tensor] = {}  # the round's update of the base
        self.kinds = {"arrays": "weights", "adapters": "factors", "factors": "factors",
                      "sketch": "seeds", "config": "config", "update": self.update_kind,
                      "deltas": "deltas", "sync": "seeds"}

    @classmethod
    def from_config(cls, settings: Settings, layers, **common: Any) -> TwoFactorLoRA:
        """Build from the run's typed settings."""
        s = settings.strategy
        return cls(layers=layers, rank=s.rank, alpha=s.alpha, sketch=s.sketch,
                   train_factor=s.train_factor, download=resolve_download(settings),
                   **cls.extra_kwargs(s.options), **common)

    @classmethod
    def extra_kwargs(cls, strategy_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Subclass-specific constructor keys taken from the ``strategy`` config group."""
        return {}

    def factor_keys(self) -> dict[str, tuple[int, int]]:
        """``<layer>.lora_A`` / ``<layer>.lora_B`` -> shape, for every target layer."""
        return {f"{n}.lora_{side}": spec.factor_shape(side, self.rank)
                for n, spec in self.layers.items() for side in ("A", "B")}

    def fresh_sketches(self, seed: int) -> dict[str, torch.Tensor]:
        """The random (non-zero) factor of every layer for fresh adapters drawn from ``seed``."""
        side = "A" if self.zero_side == "B" else "B"
        return {f"{n}.lora_{side}": make_sketch(seed, f"{n}.lora_{side}",
                                                spec.factor_shape(side, self.rank), self.sketch)
                for n, spec in self.layers.items()}

    def start_factors(self, server_round: int) -> dict[str, torch.Tensor]:
        """The factors this round's clients start from: the global adapters, or zero and the
        fresh random factor drawn from the round's seed."""
        assert self.base is not None
        dtypes = self.factor_dtypes(self.base, self.factor_keys())
        if self.adapters is not None:
            return {k: v.to(dtypes[k]) for k, v in self.adapters.items()}
        fresh = self.fresh_sketches(derive_seed(self.run_seed, server_round, FRESH_STREAM))
        return {k: fresh[k].to(dtypes[k]) if k in fresh else torch.zeros(shape, dtype=dtypes[k])
                for k, shape in self.factor_keys().items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the base weights, the adapters (or a fresh seed) and the last merge."""
        if self.base is None:
            self.base = dict(to_state_dict(arrays))
        nodes = self.sample_train_nodes(grid, server_round)
        records: dict[str, Any] = {}
        if self.update is not None:
            records["arrays"] = to_array_record(self.sent_base)
            records["update"] = to_array_record(self.update)
        else:
            records["arrays"] = to_array_record(self.base)
        if self.adapters is None:
            seed = derive_seed(self.run_seed, server_round, FRESH_STREAM)
            records["sketch"] = ConfigRecord({
                "seed": seed, "distribution": self.sketch,
                "fingerprint": fingerprint(self.fresh_sketches(seed))})
        else:
            records["adapters"] = to_array_record({k: v.to(torch.float32)
                                               for k, v in self.adapters.items()})
        records["config"] = self.train_config(
            server_round, mode="adapters", rank=self.rank, alpha=self.alpha,
            **{"train-factor": "both", "zero-factor": self.zero_side})
        if self.sync is not None:  # download=delta: per node, the base's changes or the base
            self.sync.grid = grid
            del records["arrays"]
            records.pop("update", None)
            records["config"]["download"] = "delta"
            contents = self.sync.downloads(server_round, to_array_record(self.base), nodes,
                                           records)
            return self.make_messages(server_round, contents, nodes, self.kinds)
        return self.make_messages(server_round, RecordDict(records), nodes, self.kinds)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the clients' factors (subclass rule); return base + s * B @ A for evaluation."""
        self.round_start = self.start_factors(server_round)
        self.change = {}
        if self.sync is not None:
            replies = self.sync.resolve_resyncs(
                server_round, replies,
                lambda rnd, contents, nodes: self.make_messages(rnd, contents, nodes,
                                                                self.kinds),
                self.ledger.add)
        valid = self.collect_replies(server_round, replies, "factors", self.factor_keys(),
                                     self.kinds, reference=self.round_start,
                                     dtypes={k: v.dtype for k, v in self.round_start.items()},
                                     module_reference=self.base)
        metrics = self.round_metric_record(server_round)
        if not valid:
            return None, metrics
        self.combine(server_round, valid)
        if self.module_shapes:
            self.base = self.apply_modules(server_round, self.base, valid)
            if self.sent_base is not None:  # the update record goes on top of sent_base
                self.sent_base = self.apply_modules(server_round, self.sent_base, valid)
        if self.sync is not None:  # the round's change: the update, then the modules' values
            self.sync.record(server_round, 0, {
                **self.change, **{SET_PREFIX + k: self.base[k] for k in self.module_shapes}})
        return to_array_record(self.effective_state()), metrics

    def state_dict(self) -> dict[str, Any]:
        """Base state plus the base weights, the global adapters, the last merge and the
        record kinds (FLoRA under DP sends its update as ``residual``)."""
        return {**super().state_dict(), "base": self.base, "adapters": self.adapters,
                "sent_base": self.sent_base, "update": self.update, "kinds": dict(self.kinds),
                "sync": None if self.sync is None else self.sync.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        for key in ("base", "adapters", "sent_base", "update"):
            value = state[key]
            setattr(self, key, None if value is None else dict(value))
        self.kinds = {**self.kinds, **state["kinds"]}
        if self.sync is not None and state.get("sync") is not None:
            self.sync.load_state_dict(state["sync"])

    def combine(self, server_round: int, valid: list[ValidReply]) -> None:
        """Update ``base`` / ``adapters`` / ``update`` from the round's valid replies."""
        raise NotImplementedError

    def export_factors(self) -> MergedFactors | None:
        """The merges plus the live adapters ``s * B @ A`` (see the base class)."""
        merged = super().export_factors()
        if merged is None or self.adapters is None:
            return merged
        return merged.plus({n: (self.adapters[f"{n}.lora_B"].to(torch.float64) * self.scale,
                                self.adapters[f"{n}.lora_A"]) for n in self.layers})

    def merge_into_base(self, update: Mapping[str, torch.Tensor], as_update: bool,
                        terms: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                        ) -> None:
        """``base <- base + update`` (an update record: ``<layer>.stack_B`` / ``.stack_A``
        factors or dense ``<layer>.weight`` deltas) with the clients' own
        :func:`~fedrac.wire.delta_sync.apply_update`; ``as_update`` also sends it next round on top
        of the previous base (full downloads). It is the round's change either way.
        ``terms``: the same change as factors ``(B, A)`` per layer for the export's record
        (default: the update's stacks; a dense delta makes the record unusable)."""
        assert self.base is not None
        if self.merged is not None and terms is not None:
            self.merged.add_all(terms)
        elif self.merged is not None:  # the export's record: the stacks as sent, or dense
            if any(self.layers[n].weight_key in update for n in self.layers):
                self.merged.invalidate(f"{self.name} merged a dense update")
            else:
                self.merged.add_all({n: (update[f"{n}.stack_B"].to(torch.float64),
                                         update[f"{n}.stack_A"].to(torch.float64))
                                     for n in self.layers if f"{n}.stack_B" in update})
        before = dict(self.base)
        self.base = apply_update(dict(self.base), update, self.layers)
        self.sent_base = before if as_update else None
        self.update = dict(update) if as_update else None
        self.change = dict(update)

    def effective_state(self) -> dict[str, torch.Tensor]:
        """The model the server evaluates: base weights plus ``s * B @ A`` of the adapters."""
        assert self.base is not None
        state = dict(self.base)
        if self.adapters is None:
            return state
        for name, spec in self.layers.items():
            w = state[spec.weight_key]
            state[spec.weight_key] = (w.to(torch.float64) + lora_product(
                self.adapters[f"{name}.lora_A"], self.adapters[f"{name}.lora_B"], self.scale,
                spec)).to(w.dtype)
        return state
