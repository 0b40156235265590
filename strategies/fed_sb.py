"""Fed-SB (Singhal et al., arXiv 2502.15436): fixed ``B`` and ``A``, clients train ``R`` (r x r).

LoRA-SB's initialisation (the paper's code, ``find_and_initialize_grad``): the first
gradient ``G`` of each target weight (``d_out x d_in``), summed over a few examples, becomes
one Adam-like step ``M = -eta * sign(G)``; its truncated SVD ``M ~ U_r S_r V_rᵀ`` gives the
frozen ``B = U_r`` (``d_out x r``), ``A = V_rᵀ`` (``r x d_in``) and the start ``R_0 = S_r``
(scaled by ``1 / s`` here, so that ``s * B R_0 A = trunc_r(M)`` whatever ``alpha``; the
paper sets ``alpha = r``, ``s = 1``). See docs/fed_sb.md for where fedrac deviates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedrac.adapters import LayerSpec
from fedrac.adapters.lora_sb import INIT_RANK_KEY, INIT_STEP_KEY, SVD_PARTS, signed_step_svd
from fedrac.adapters.sketch import derive_seed, fingerprint, make_sketch
from fedrac.settings.typed import Settings
from fedrac.wire.delta_sync import SET_PREFIX, merge_middle
from fedrac.wire.ledger import record_dict_nbytes
from fedrac.wire.records import to_array_record, to_shared_state_dict
from strategies.base import FedracStrategy, require_choice
from strategies.delta_sync import DOWNLOADS, DeltaSync, resolve_download

INITS = ("gradient", "random")
INIT_STREAM = 7  # derive_seed(run_seed, 0, INIT_STREAM): the init's clients, random factors
KINDS = {"arrays": "weights", "adapters": "factors", "factors": "factors", "config": "config",
         "gradient": "gradient", "deltas": "deltas", "sync": "seeds"}
FINGERPRINT_KEY = "frame-fingerprint"  # clients.fed_sb.FINGERPRINT_KEY
INIT_TIMEOUT = 3600.0  # seconds the init waits for the gradients (a round's default timeout)


def svd_shapes(spec: LayerSpec, rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of one layer's ``U_r``, ``S_r``, ``V_rᵀ`` in a low-rank init reply."""
    return dict(zip((f"{spec.name}.{p}" for p in SVD_PARTS),
                    ((spec.d_out, rank), (rank,), (rank, spec.d_in)), strict=True))


def lora_sb_init(gradient: torch.Tensor, rank: int, step: float, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, A, R_0)`` of one layer from its first gradient (``d_out x d_in``): the truncated
    SVD of ``M = -step * sign(G)``, ``B = U_r``, ``A = V_rᵀ``, ``R_0 = S_r / scale`` (float64;
    ``scale * B @ R_0 @ A`` is the best rank-``r`` approximation of ``M``)."""
    return factors_from_svd(*signed_step_svd(gradient, rank, step), scale)


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, A, R_0) = (U_r, V_rᵀ, diag(S_r) / scale)`` in float64."""
    return u.to(torch.float64), vh.to(torch.float64), torch.diag(s.to(torch.float64)) / scale


class FedSB(FedracStrategy):
    """Fed-SB: per target layer ``W <- W + s * B @ R_bar @ A`` each round, ``B``/``A`` fixed.

    ``init``: ``gradient`` (LoRA-SB: before round 1 ``init_clients`` seeded clients take
    the mean gradient of the target weights over up to ``init_samples`` examples; one client
    uploads the truncated SVD of its ``-eta sign(G)``, ``r (d_in + d_out + 1)`` numbers per
    layer, several upload their full gradients, whose example-weighted mean gives ``B``,
    ``A``, ``R_0`` by :func:`lora_sb_init` (ledger kind ``gradient`` either way), with
    ``eta = init_step`` (default: the lr of the first local step,
    ``client.lr / client.warmup_steps``), and the server merges
    ``s * B R_0 A`` into the weights before round 1) or ``random`` (``B``, ``A`` drawn from the
    run seed with ``sketch``, ``R_0 = 0``: no data leaves a client before training).
    Each round clients start ``R`` at zero on the merged weights (the same step as the
    paper's ``R`` kept across rounds, fedrac's methods merging every round), train it only
    (plus ``model.trainable_modules``) and reply ``<layer>.lora_R`` (r x r). The server
    averages ``R`` with the run's aggregation rule (privacy=dp: the private mean), exact
    since ``B`` and ``A`` are shared: ``B (sum_k p_k R_k) A = sum_k p_k B R_k A``.
    ``B``, ``A`` go to each node once (record ``adapters``, kind ``factors``); the node keeps
    them (:mod:`clients.fed_sb`), a node that failed gets them again.
    ``download``: ``full`` (the weights every round) or ``delta`` (a node that holds the
    weights gets each missed round's ``R_bar`` and trained modules' values:
    :class:`strategies.delta_sync.DeltaSync`).
    """

    name = "fed_sb"
    TRAIN_FACTORS = ("R",)
    DOWNLOADS = DOWNLOADS
    IGNORED_KEYS = ("resample_every", "train_factor")

    def __init__(
        self, *, layers: Mapping[str, LayerSpec], rank: int, alpha: float,
        sketch: str = "orthogonal", init: str = "gradient", init_samples: int = 170,
        init_clients: int = 1, init_step: float | None = None, download: str = "full",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_choice("strategy.init", init, INITS, self.name)
        require_choice("strategy.download", download, DOWNLOADS)
        self.sync = DeltaSync() if download == "delta" else None
        self.check_init(init_samples, init_clients, init_step)
        self.set_adapters(layers, rank, alpha, sketch)
        self.init, self.init_samples, self.init_clients = init, int(init_samples), \
            int(init_clients)
        # the paper's eta = lr / (warmup_ratio * total_steps): the lr of a linear warm-up's
        # first step
        first = float(self.client_config.get("lr", 0.0)) / max(
            int(self.client_config.get("warmup-steps", 0)), 1)
        self.init_step = float(init_step) if init_step is not None else first
        self.frame: dict[str, torch.Tensor] | None = None  # <layer>.lora_A / .lora_B, float32
        self.holders: set[int] = set()  # nodes that hold the frame
        self._global: ArrayRecord | None = None
        self._frame_fp: tuple[dict[str, torch.Tensor], str] | None = None

    @classmethod
    def from_config(cls, settings: Settings, layers, **common: Any) -> FedSB:
        """Build from the run's typed settings."""
        s, o = settings.strategy, settings.strategy.options
        return cls(layers=layers, rank=s.rank, alpha=s.alpha, sketch=s.sketch,
                   init=o.get("init", "gradient"), init_samples=o.get("init_samples", 170),
                   init_clients=o.get("init_clients", 1), init_step=o.get("init_step"),
                   download=resolve_download(settings), **common)

    @staticmethod
    def check_init(samples: Any, clients: Any, step: Any) -> None:
        """Raise ``ValueError`` (one line) for a bad ``init_samples`` / ``init_clients`` /
        ``init_step``."""
        for key, value in (("init_samples", samples), ("init_clients", clients)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"strategy.{key}={value!r} is not allowed; allowed: an "
                                 "integer >= 1")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int | float)
                                 or not step > 0):
            raise ValueError(f"strategy.init_step={step!r} is not allowed; allowed: null "
                             "(client.lr / client.warmup_steps) or a number > 0")

    @classmethod
    def validate_config(cls, strategy_cfg: Mapping[str, Any]) -> None:
        """Check the keys only Fed-SB has."""
        s = strategy_cfg
        require_choice("strategy.init", s.get("init", "gradient"), INITS, cls.name)
        cls.check_init(s.get("init_samples", 170), s.get("init_clients", 1), s.get("init_step"))

    @classmethod
    def validate_run(cls, cfg: Mapping[str, Any]) -> None:
        """The options Fed-SB cannot serve (``ValueError``, one line)."""
        s = cfg["strategy"]
        privacy = (cfg.get("privacy") or {}).get("mode", "none")
        secagg = (cfg.get("secagg") or {}).get("name", "none")
        if s.get("init", "gradient") == "gradient" and (privacy != "none" or secagg != "none"):
            raise ValueError(
                f"strategy.init=gradient is not allowed with privacy={privacy} / "
                f"secagg={secagg} (a client's raw gradient would reach the server outside the "
                "privacy accounting and the masked sum); allowed: strategy.init=random")
        if (cfg.get("model") or {}).get("quantization", "none") not in (None, "none") and \
                s.get("init", "gradient") == "gradient":
            raise ValueError("strategy.init=gradient is not allowed with model.quantization "
                             "(a quantised weight has no gradient); allowed: "
                             "strategy.init=random, or model.quantization=none")

    # ------------------------------------------------------------ initialisation
    def initialise(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """Compute ``B``, ``A`` (and ``R_0``); return the weights with ``s * B R_0 A`` merged."""
        if self.init == "random":
            seed = derive_seed(self.run_seed, 0, INIT_STREAM)
            self.frame = {f"{n}.lora_{side}": make_sketch(seed, f"{n}.lora_{side}",
                                                          spec.factor_shape(side, self.rank),
                                                          self.sketch)
                          for n, spec in self.layers.items() for side in ("A", "B")}
            return arrays
        inits = self.client_inits(server_round, arrays, grid)
        state = dict(to_shared_state_dict(arrays))
        frame, start = {}, {}
        for name, (b, a, r0) in inits.items():
            frame[f"{name}.lora_A"], frame[f"{name}.lora_B"] = a.float(), b.float()
            start[name] = (b @ r0, a)
        self.frame = frame
        for name, (br, a) in start.items():
            spec = self.layers[name]
            w = state[spec.weight_key]
            state[spec.weight_key] = (w.to(torch.float64) + spec.delta(a, br, self.scale)
                                      ).to(w.dtype)
        if self.merged is not None:
            self.merged.add_all({n: (br * self.scale, a) for n, (br, a) in start.items()})
        log(INFO, "fed_sb: B, A from the clients' first gradient (rank %d)", self.rank)
        return to_array_record(state)

    def client_inits(self, server_round: int, arrays: ArrayRecord, grid: Grid
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer ``(B, A, R_0)`` from ``init_clients`` seeded clients: one client sends
        the truncated SVD of its own ``-eta sign(G)`` (``U_r``, ``S_r``, ``V_rᵀ``: the same
        init, ``r (d_in + d_out + 1)`` numbers per layer); several send their full gradients,
        whose example-weighted mean the server signs (``RuntimeError`` when none replies
        usably)."""
        import random

        nodes = sorted(grid.get_node_ids())
        rng = random.Random(derive_seed(self.run_seed, 0, INIT_STREAM))
        chosen = sorted(rng.sample(nodes, min(self.init_clients, len(nodes))))
        low_rank = len(chosen) == 1  # no mean to take before the sign: the client can SVD
        extra = {INIT_RANK_KEY: self.rank, INIT_STEP_KEY: self.init_step} if low_rank else {}
        content = RecordDict({"arrays": arrays, "config": self.train_config(
            server_round, mode="gradient", **{"init-samples": self.init_samples}, **extra)})
        messages = self.same_message(server_round, content, chosen, MessageType.TRAIN, KINDS)
        if low_rank:
            expected = {k: shape for spec in self.layers.values()
                        for k, shape in svd_shapes(spec, self.rank).items()}
        else:
            expected = {spec.weight_key: (spec.d_out, spec.d_in) for spec in self.layers.values()}
        total: dict[str, torch.Tensor] = {}
        weight = 0.0
        for msg in grid.send_and_receive(messages, timeout=INIT_TIMEOUT):
            if msg.has_error():
                log(INFO, "fed_sb: a gradient request failed: %s", msg.error.reason)
                continue
            self.ledger.add(server_round, "up", record_dict_nbytes(msg.content, KINDS))
            reason = self.stale_reason(server_round, msg, {})
            reply = None
            if reason is None:
                reason, reply = self._check_reply(msg, "gradient", expected,
                                                  dict.fromkeys(expected, torch.float32))
            if reason is not None:
                log(INFO, "fed_sb: a gradient reply was rejected: %s", reason)
                continue
            for key, g in reply.tensors.items():
                total[key] = total.get(key, 0) + g.to(torch.float64) * reply.weight
            weight += reply.weight
        if not weight:
            raise RuntimeError("fed_sb: no client sent a usable gradient for the "
                               "initialisation of B and A")
        mean = {k: v / weight for k, v in total.items()}
        if low_rank:
            return {n: factors_from_svd(*(mean[f"{n}.{p}"] for p in SVD_PARTS), self.scale)
                    for n in self.layers}
        return {n: lora_sb_init(mean[spec.weight_key], self.rank, self.init_step, self.scale)
                for n, spec in self.layers.items()}

    # ------------------------------------------------------------------ rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the weights, the fixed factors to the nodes without them, and the settings."""
        if self.frame is None:
            arrays = self.initialise(server_round, arrays, grid)
        assert self.frame is not None
        self._global = arrays
        nodes = self.sample_train_nodes(grid, server_round)
        cfg = self.train_config(server_round, mode="adapters", rank=self.rank, alpha=self.alpha,
                                **{"train-factor": "R", FINGERPRINT_KEY: self.frame_fingerprint()})
        if self.sync is not None:  # download=delta: per node, the rounds' R_bar or the weights
            self.sync.grid = grid
            cfg["download"] = "delta"
            contents = self.sync.downloads(server_round, arrays, nodes, {"config": cfg})
        else:
            contents = dict.fromkeys(nodes, RecordDict({"arrays": arrays, "config": cfg}))
        contents = self.frame_to_new_holders(contents)
        self.holders.update(nodes)
        return self.make_messages(server_round, contents, nodes, KINDS)

    def frame_fingerprint(self) -> str:
        """The fingerprint of the fixed factors, hashed once per frame (the frame is replaced,
        never changed in place)."""
        assert self.frame is not None
        if self._frame_fp is None or self._frame_fp[0] is not self.frame:
            self._frame_fp = (self.frame, fingerprint(self.frame))
        return self._frame_fp[1]

    def frame_to_new_holders(self, contents: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """``contents`` with ``B``, ``A`` (record ``adapters``) added for the nodes that may
        not hold them (one copy of each distinct content; encoded only when one is needed)."""
        assert self.frame is not None
        frame: ArrayRecord | None = None
        added: dict[int, RecordDict] = {}
        out = {}
        for node, content in contents.items():
            if node in self.holders:
                out[node] = content
                continue
            if id(content) not in added:
                frame = frame if frame is not None else to_array_record(self.frame)
                added[id(content)] = RecordDict({**dict(content.items()), "adapters": frame})
            out[node] = added[id(content)]
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average ``R`` and merge ``s * B @ R_bar @ A`` into the global weights."""
        assert self._global is not None and self.frame is not None
        replies = list(replies)
        to = {m.metadata.message_id: int(m.metadata.dst_node_id)
              for m in self.sent.get(server_round, [])}
        answered = {self.reply_node(m, to) for m in replies if not m.has_error()}
        self.holders -= set(to.values()) - answered  # failed or silent: it may lack the frame
        if self.sync is not None:  # a resync gets the full weights, and B, A with them
            replies = self.sync.resolve_resyncs(
                server_round, replies, lambda rnd, contents, nodes: self.make_messages(
                    rnd, {n: RecordDict({**dict(c.items()),
                                         "adapters": to_array_record(self.frame)})
                          for n, c in contents.items()}, nodes, KINDS), self.ledger.add)
        expected = {f"{n}.lora_R": (self.rank, self.rank) for n in self.layers}
        current, valid, metrics = self.collect_factor_replies(server_round, replies, expected,
                                                              KINDS)
        if not valid:
            return None, metrics
        avg = self.average(server_round, valid)  # R starts at zero: the reply is the update
        state = merge_middle(current, self.layers, self.frame, avg, self.scale)
        if self.merged is not None:
            self.merged.add_all({
                n: (self.frame[f"{n}.lora_B"].to(torch.float64)
                    @ avg[f"{n}.lora_R"].to(torch.float64) * self.scale,
                    self.frame[f"{n}.lora_A"].to(torch.float64)) for n in self.layers})
        state = self.apply_modules(server_round, state, valid)
        if self.sync is not None:  # the round's change: R_bar, then the modules' new values
            self.sync.record(server_round, 0, {
                **avg, **{SET_PREFIX + k: state[k] for k in self.module_shapes}})
        return to_array_record(state), metrics

    def state_dict(self) -> dict[str, Any]:
        """Base state plus the fixed factors (a resumed run sends them to every node again)."""
        return {**super().state_dict(), "frame": self.frame,
                "sync": None if self.sync is None else self.sync.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        self.frame = None if state.get("frame") is None else dict(state["frame"])
        self.holders = set()
        if self.sync is not None and state.get("sync") is not None:
            self.sync.load_state_dict(state["sync"])
