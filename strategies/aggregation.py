"""How every fedrac strategy turns its clients' replies into one update: screen, then rule.

A strategy hands its checked replies here as *values* together with the *reference* each
client started from; the **update** of client ``k`` is ``u_k = value_k - reference``:

- ``fedavg``: the client's full weights minus the global weights it received;
- ``rac_lora`` / ``ffa_lora``: the trained factor (it starts at zero, so reference = 0);
- ``fedit``, ``cola``, ``fedex_lora``, ``flora``: each factor minus the factor the client
  received (persistent adapters) or drew from the round's seed (fresh ones).

**Screen** (:meth:`Aggregator.screen`, every rule):

- ``max_client_weight``: a reply's ``num-examples`` counts at most this much: ``auto``
  (default: the largest partition the server knows of; under deployment, where it knows
  none, ``10x``), a number, ``"<k>x"`` (k times the round's median claim) or null (no cap);
- ``max_update_norm``: a reply whose update has an L2 norm (over all its tensors) above
  this is dropped with a logged reason: null (off), a number, ``auto`` (= ``10x``) or
  ``"<k>x"`` (k times the round's median update norm). ``default``: ``auto``, except off
  under ``privacy=dp`` (a bound set by the other clients' norms breaks DP's sensitivity) and
  ``secagg=plus`` (the server sees no single update).

**Rules** (``aggregation=<name>``, ``conf/aggregation/<name>.yaml``), per tensor, in float64:

- ``mean``: ``sum_k p_k u_k`` with ``p_k = w_k / sum w`` (normalised by the largest weight
  first, so no sum of weights overflows);
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * n)`` smallest and largest
  updates and average the rest (unweighted);
- ``median``: per coordinate, the median of the updates (unweighted; the mean of the two middle
  values when n is even);
- ``norm_clip``: every update scaled down to at most the round's median update norm, then
  ``mean``.

The robust rules count each client once: a claimed ``num-examples`` buys no influence.
A new rule -- client-level differential privacy, say: clip every update to ``clip_norm``
(:meth:`Rule.scales`), uniform weights (:meth:`Rule.coefficients`), Gaussian noise on the
sum (:meth:`Rule.combine`) -- is one more :class:`Rule` subclass in :data:`RULES` and one more
``conf/aggregation/<name>.yaml``; the strategies do not change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.supercore import log

AUTO_MULTIPLE = 10.0  # ``auto`` bounds: 10x the round's median (update norm or num-examples)


class Updates(Sequence[torch.Tensor]):
    """The clients' float64 updates of one tensor, computed when read (``mean`` streams)."""

    def __init__(self, values: Sequence[Mapping[str, torch.Tensor]], key: str,
                 reference: Mapping[str, torch.Tensor] | None) -> None:
        self.values, self.key = values, key
        self.ref = None if reference is None else reference[key].to(torch.float64)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        value = self.values[i][self.key].to(torch.float64)
        return value if self.ref is None else value - self.ref

    def stacked(self) -> torch.Tensor:
        """All updates as one ``(n, *shape)`` tensor."""
        return torch.stack(list(self))


def normalised(weights: Sequence[float]) -> torch.Tensor:
    """``w_k / sum w`` in float64; when the sum overflows, ``(w_k / max w) / sum(w / max w)``."""
    ws = [float(x) for x in weights]
    if not ws or not all(math.isfinite(x) and x > 0 for x in ws):
        raise ValueError(f"weights must be finite and > 0, got {ws[:5]}")
    total = sum(ws)
    if not math.isfinite(total):
        top = max(ws)
        ws = [x / top for x in ws]
        total = sum(ws)
    return torch.tensor([x / total for x in ws], dtype=torch.float64)


class Rule:
    """An aggregation rule: per-client scaling, per-client coefficients, per-tensor combine.

    ``linear`` rules combine as ``sum_k c_k u_k`` with ``c = coefficients(weights)`` (FLoRA's
    stacking needs one coefficient per client); the others are order statistics.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = True
    default_max_update_norm: ClassVar[Any] = None
    # combine on the values instead of the updates: the same for a weighted mean (the
    # coefficients sum to 1), and bit-identical to fedrac's earlier FedAvg arithmetic
    on_values: ClassVar[bool] = False

    def __init__(self, settings: Mapping[str, Any], run_seed: int = 0) -> None:
        self.settings, self.run_seed = dict(settings), int(run_seed)

    def scales(self, norms: Sequence[float]) -> list[float]:
        """The factor each client's whole update is multiplied by (1: unchanged)."""
        return [1.0] * len(norms)

    def coefficients(self, weights: Sequence[float]) -> torch.Tensor:
        """Each client's share of the combination (float64, sums to 1)."""
        return normalised(weights)

    def combine(self, key: str, updates: Updates, coefficients: torch.Tensor,
                server_round: int) -> torch.Tensor:
        """The aggregate of one tensor's updates (float64)."""
        acc: torch.Tensor | None = None
        for c, u in zip(coefficients.tolist(), updates, strict=True):
            acc = u * c if acc is None else acc + u * c
        assert acc is not None
        return acc


class Mean(Rule):
    """``sum_k p_k u_k``, ``p_k`` proportional to ``num-examples`` (the FedAvg rule)."""

    name = "mean"
    on_values = True
    default_max_update_norm = "auto"  # null under privacy=dp / secagg=plus (build_aggregator)


class OrderStatistic(Rule):
    """A per-coordinate rule on the sorted updates; every client counts once (unweighted)."""

    linear = False
    default_max_update_norm = "auto"

    def coefficients(self, weights: Sequence[float]) -> torch.Tensor:
        return torch.full((len(weights),), 1.0 / len(weights), dtype=torch.float64)

    def combine(self, key, updates, coefficients, server_round):
        return self.pick(updates.stacked().sort(dim=0).values)

    def pick(self, ordered: torch.Tensor) -> torch.Tensor:
        """The aggregate of ``(n, *shape)`` updates sorted along the client axis."""
        raise NotImplementedError


class TrimmedMean(OrderStatistic):
    """Per coordinate: drop ``floor(trim_fraction * n)`` updates at each end, average the rest."""

    name = "trimmed_mean"

    def pick(self, ordered: torch.Tensor) -> torch.Tensor:
        n = len(ordered)
        k = int(math.floor(float(self.settings.get("trim_fraction", 0.1)) * n))
        return ordered[k:n - k].mean(dim=0)


class Median(OrderStatistic):
    """Per coordinate: the median update (mean of the two middle ones for even ``n``)."""

    name = "median"

    def pick(self, ordered: torch.Tensor) -> torch.Tensor:
        n = len(ordered)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class NormClip(Rule):
    """Every update scaled to at most the round's median update norm, then the weighted mean."""

    name = "norm_clip"
    default_max_update_norm = "auto"
    on_values = True  # the clipping was applied to each reply by the screen

    def scales(self, norms: Sequence[float]) -> list[float]:
        bound = median(norms)
        return [1.0 if n <= bound else bound / n for n in norms]


RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (Mean, TrimmedMean, Median, NormClip)}


def median(xs: Sequence[float]) -> float:
    """The median of ``xs`` (mean of the two middle values for an even count)."""
    s = sorted(float(x) for x in xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def parse_bound(value: Any, key: str) -> float | str | None:
    """``null`` | number > 0 | ``auto`` | ``"<k>x"`` (k >= 1) -> None, float or ``"<k>x"``.

    Raises ``ValueError`` naming ``aggregation.<key>`` and what is allowed.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return f"{AUTO_MULTIPLE:g}x"
        if text.endswith("x"):
            try:
                k = float(text[:-1])
            except ValueError:
                k = math.nan
            if math.isfinite(k) and k >= 1:
                return f"{k:g}x"
    raise ValueError(f"aggregation.{key}={value!r} is not allowed; allowed: null, a number > 0, "
                     f"auto ({AUTO_MULTIPLE:g}x the round's median) or '<k>x' with k >= 1")


def _bound(spec: float | str | None, values: Sequence[float]) -> float | None:
    """The absolute bound of ``spec`` for this round's ``values`` (relative specs: k x median)."""
    if spec is None or isinstance(spec, float):
        return spec
    return float(spec[:-1]) * median(values)


def check_config(agg: Mapping[str, Any], strategy_cls: type | None = None) -> None:
    """Check the ``aggregation`` group (``ValueError`` naming the key on the first bad value)."""
    name = agg.get("name", "mean")
    if name not in RULES:
        raise ValueError(f"aggregation={name!r} is not an aggregation rule; allowed: "
                         f"{', '.join(RULES)}")
    tf = agg.get("trim_fraction", 0.1)
    if not (isinstance(tf, int | float) and not isinstance(tf, bool) and 0 <= tf < 0.5):
        raise ValueError(f"aggregation.trim_fraction={tf!r} is not allowed; allowed: a number "
                         "in [0, 0.5)")
    if agg.get("max_update_norm") != "default":
        parse_bound(agg.get("max_update_norm"), "max_update_norm")
    parse_bound(agg.get("max_client_weight", "auto"), "max_client_weight")
    if strategy_cls is not None and getattr(strategy_cls, "linear_aggregation_only", False) \
            and not RULES[name].linear:
        linear = [n for n, r in RULES.items() if r.linear]
        raise ValueError(f"aggregation={name} is not allowed for strategy "
                         f"{strategy_cls.name} (it combines each client's factors with one "
                         f"coefficient); allowed: {', '.join(linear)}")


class Aggregator:
    """The screen and the rule of a run (see the module docstring).

    ``known_max_weight``: the largest number of examples any client can hold (the largest
    partition in simulation); ``max_client_weight=auto`` caps at it, or at ``10x`` the
    round's median claim when it is ``None``.
    """

    def __init__(
        self, name: str = "mean", *, trim_fraction: float = 0.1,
        max_update_norm: Any = "default", max_client_weight: Any = "auto",
        known_max_weight: float | None = None, run_seed: int = 0,
    ) -> None:
        settings = {"name": name, "trim_fraction": trim_fraction,
                    "max_client_weight": max_client_weight}
        if max_update_norm != "default":
            settings["max_update_norm"] = max_update_norm
        check_config(settings)
        self.rule = RULES[name](settings, run_seed)
        self.max_update_norm = parse_bound(
            RULES[name].default_max_update_norm if max_update_norm == "default"
            else max_update_norm, "max_update_norm")
        weight = parse_bound(max_client_weight, "max_client_weight")
        if isinstance(max_client_weight, str) and max_client_weight.strip().lower() == "auto" \
                and known_max_weight is not None:
            weight = float(known_max_weight)
        self.max_client_weight = weight

    @classmethod
    def from_config(cls, agg: Mapping[str, Any] | None, known_max_weight: float | None = None,
                    run_seed: int = 0) -> Aggregator:
        """Build from the ``aggregation`` config group (``None``: the defaults)."""
        agg = dict(agg or {})
        out = cls(agg.get("name", "mean"), trim_fraction=agg.get("trim_fraction", 0.1),
                  max_update_norm=agg.get("max_update_norm", "default"),
                  max_client_weight=agg.get("max_client_weight", "auto"),
                  known_max_weight=known_max_weight, run_seed=run_seed)
        log(INFO, "aggregation: %s", out.describe())
        return out

    def describe(self) -> str:
        """One line: the rule and the screen's bounds."""
        w = self.max_client_weight
        cap = "no limit" if w is None else (f"{w.rstrip('x')}x the median claim"
                                             if isinstance(w, str) else f"{w:g}")
        return (f"rule {self.rule.name}, num-examples capped at {cap}, update norm bound "
                f"{self.max_update_norm or 'off'}")

    # ------------------------------------------------------------------ screen
    def screen(
        self, server_round: int, nodes: Sequence[int],
        values: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        reference: Mapping[str, torch.Tensor] | None,
    ) -> tuple[list[int], list[float], list[float]]:
        """Cap weights, drop updates over the norm bound, get the rule's per-client scales.

        Returns the indices kept, their (capped) weights and their scales; every cap, drop
        and clip is logged with its reason.
        """
        if not values:
            return [], [], []
        claims = [float(w) for w in weights]
        cap = _bound(self.max_client_weight, claims)
        capped = []
        for node, w in zip(nodes, claims, strict=True):
            if cap is not None and w > cap:
                log(WARNING, "round %d: node %d claims num-examples=%g; counted as %g "
                    "(aggregation.max_client_weight=%s)", server_round, node, w, cap,
                    self.max_client_weight)
                w = cap
            capped.append(w)
        norms = [update_norm(v, reference) for v in values]
        bound = _bound(self.max_update_norm, norms)
        kept = []
        for i, n in enumerate(norms):
            if bound is not None and not n <= bound:
                log(WARNING, "round %d: reply of node %d dropped: update norm %.4g exceeds "
                    "aggregation.max_update_norm=%s (%.4g)", server_round, nodes[i], n,
                    self.max_update_norm, bound)
                continue
            kept.append(i)
        scales = self.rule.scales([norms[i] for i in kept]) if kept else []
        for i, s in zip(kept, scales, strict=True):
            if s != 1.0:
                log(INFO, "round %d: update of node %d clipped from norm %.4g to %.4g (%s)",
                    server_round, nodes[i], norms[i], norms[i] * s, self.rule.name)
        return kept, [capped[i] for i in kept], scales

    # --------------------------------------------------------------- combine
    def coefficients(self, weights: Sequence[float]) -> torch.Tensor:
        """Per-client coefficients of a linear rule (``ValueError`` for an order statistic)."""
        if not self.rule.linear:
            raise ValueError(f"aggregation={self.rule.name} has no per-client coefficients")
        return self.rule.coefficients(weights)

    def aggregate(
        self, server_round: int, values: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float], reference: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``reference + rule(values - reference)`` per tensor, in the reference's dtype (or the
        values' dtype when ``reference`` is ``None``, i.e. zero)."""
        coefficients = self.rule.coefficients(weights)
        against = None if self.rule.on_values else reference
        out: dict[str, torch.Tensor] = {}
        for key, first in values[0].items():
            agg = self.rule.combine(key, Updates(values, key, against), coefficients,
                                    server_round)
            dtype = first.dtype if reference is None else reference[key].dtype
            if against is not None:
                agg = agg + against[key].to(torch.float64)
            if not dtype.is_floating_point and not dtype.is_complex:
                agg = agg.round()
            out[key] = agg.reshape(first.shape).to(dtype)
        return out


def update_norm(values: Mapping[str, torch.Tensor],
                reference: Mapping[str, torch.Tensor] | None) -> float:
    """``||values - reference||_2`` over all tensors (float64; ``inf`` when it overflows)."""
    total = 0.0
    for key, v in values.items():
        u = v.to(torch.float64)
        if reference is not None:
            u = u - reference[key].to(torch.float64)
        total += float(torch.linalg.vector_norm(u)) ** 2
    return math.sqrt(total) if math.isfinite(total) else math.inf


def scaled(values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None,
           scale: float) -> dict[str, torch.Tensor]:
    """``reference + scale * (values - reference)`` in the values' dtypes."""
    out = {}
    for key, v in values.items():
        ref = None if reference is None else reference[key].to(torch.float64)
        u = v.to(torch.float64) if ref is None else v.to(torch.float64) - ref
        w = u * scale if ref is None else ref + u * scale
        out[key] = w.to(v.dtype)
    return out
