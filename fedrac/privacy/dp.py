"""Client-level differential privacy: settings, the clip-and-noise rule, calibration, accounting.

``privacy=<mode>`` (``conf/privacy/<mode>.yaml``):

- ``none``: the strategies' own (weighted) averages.
- ``dp``: central DP, DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963). Each client's
  **update** ``u_k`` is clipped to ``clip_norm`` C (one L2 norm over all its tensors), the
  server adds Gaussian noise of std ``noise_multiplier * C`` to the **sum** and divides by
  the expected cohort size ``m``: ``reference + (sum_k clip(u_k) + N(0, (sigma C)^2 I)) / m``.
  Every client weighs the same (``1/m``, not its ``num-examples``: a weight by examples would
  let one client's share exceed ``C/m``), and ``m`` is fixed, not the number of replies that
  came back, so the sensitivity of the mean is ``C/m``. ``clipping=adaptive`` moves C toward
  the ``target_quantile`` of the update norms with its own noised count (Andrew et al. 2021,
  arXiv 1905.03871; the noise split of Flower's ``compute_adaptive_noise_params``).
- ``local_dp``: every client clips its own update to C and adds ``N(0, (sigma C)^2 I)``
  before replying (:func:`privatize_update`); the server aggregates as usual.

What the update is: ``fedavg`` the full weights minus the global ones; ``rac_lora`` /
``ffa_lora`` the trained factor (it starts at zero); the two-factor methods both factors
minus the ones the client started from (FedEx-LoRA also its dense product, FLoRA only its
dense product: see docs/privacy.md).

**Sampling and accounting** (Flower's ``RdpAccountant`` over Google's ``dp-accounting``):
``sampling=poisson`` (default) samples each client independently with probability
``q = m / num_clients`` every round, neighbouring federations differ by adding or removing one
client, and each round is a Poisson-subsampled Gaussian of multiplier sigma (``q = 1`` is the
plain Gaussian). ``sampling=fixed`` keeps fedrac's sampling of exactly ``m`` clients without
replacement; then neighbours differ by replacing one client, whose sum moves by up to 2C, so
each round is a without-replacement-subsampled Gaussian of multiplier ``sigma / 2``.
Local DP accounts each client's own releases (no amplification: the server knows who took
part) with multiplier ``sigma / 2`` (two of a client's clipped updates differ by up to 2C) and
reports the largest epsilon over clients. ``delta`` defaults to ``1 / num_clients^1.1``
(at most 0.1); a delta of ``1 / num_clients`` or more is refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedrac.settings.errors import ConfigError
from fedrac.settings.typed import Settings

MODES = ("none", "dp", "local_dp")
SAMPLINGS = ("poisson", "fixed")
CLIPPINGS = ("fixed", "adaptive")
NOISE_STREAM = 101  # derive_seed(run_seed, round, NOISE_STREAM): central noise on the sum
COUNT_STREAM = 102  # derive_seed(run_seed, round, COUNT_STREAM): adaptive clipping's count noise
LOCAL_STREAM = 103  # derive_seed(run_seed, round, LOCAL_STREAM, node): a client's local noise
MIN_NOISE_MULTIPLIER = 1e-3  # calibration searches [this, max_noise_multiplier]
DELTA_EXPONENT = 1.1  # default delta = 1 / num_clients^1.1


class PrivacyConfigError(ConfigError):
    """A privacy setting that cannot work (one line: key, value, what is allowed)."""


@dataclass(frozen=True)
class PrivacySettings:
    """The ``privacy`` config group, checked, with the noise multiplier resolved."""

    mode: str = "none"
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    delta: float = 0.1
    target_epsilon: float | None = None
    sampling: str = "poisson"
    clipping: str = "fixed"
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float | None = None
    num_clients: int = 1
    cohort: int = 1  # m: clients sampled per round (the expected number under Poisson)
    num_rounds: int = 1

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def central(self) -> bool:
        return self.mode == "dp"

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.num_clients

    def describe(self) -> str:
        """One line for the log: mode, sigma, C, sampling, delta."""
        if not self.enabled:
            return "privacy: none"
        clip = f"C={self.clip_norm:g}" + (f" (adaptive, quantile {self.target_quantile:g})"
                                          if self.clipping == "adaptive" else "")
        return (f"privacy: {self.mode}, noise_multiplier={self.noise_multiplier:.4g}, {clip}, "
                f"{self.sampling} sampling of {self.cohort}/{self.num_clients} clients, "
                f"delta={self.delta:.3g}")


# ----------------------------------------------------------------------------- accounting
def _flower_accounting():
    if "absl.logging" not in sys.modules:
        # absl builds its log handler at import on the *current* sys.stderr; under a capturing
        # test runner that stream is closed later, and the next logging reconfiguration (Hydra)
        # fails flushing it. Bind it to the process's real stderr.
        with contextlib.redirect_stderr(sys.__stderr__):
            import absl.logging  # noqa: F401
    from flwr.serverapp import RdpAccountant
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    return RdpAccountant, GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Keep dp-accounting's per-order warnings quiet and out of the root logger: absl calls
    ``logging.basicConfig()`` when the root logger has no handler, which would bind a stderr
    handler for the rest of the process (and to a test's captured stream)."""
    root, absl = logging.getLogger(), logging.getLogger("absl")
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
        if guard is not None:
            root.removeHandler(guard)


def event_multiplier(noise_multiplier: float, mode: str, sampling: str) -> float:
    """The accountant's noise multiplier (noise std over L2 sensitivity) of one release."""
    replace_one = mode == "local_dp" or sampling == "fixed"
    return noise_multiplier / 2 if replace_one else noise_multiplier


class Accountant:
    """Epsilon spent so far, with Flower's ``RdpAccountant`` (one event per released round).

    ``central``: one subsampled Gaussian per round (see the module docstring for the
    sampling and neighbouring relation). ``local``: each client's releases, no amplification;
    :attr:`epsilon` is the largest over clients.
    """

    def __init__(self, s: PrivacySettings) -> None:
        self.s = s
        self.rounds = 0
        self.per_node: dict[int, int] = {}
        self.epsilon = 0.0 if s.noise_multiplier > 0 else math.inf
        self._cache: dict[int, float] = {}
        if s.noise_multiplier > 0:
            self._acc = new_accountant(s)

    def release(self, nodes: Sequence[int] = ()) -> float:
        """Compose one released round (``nodes``: the clients that noised locally); the epsilon."""
        if self.s.noise_multiplier <= 0:
            return math.inf
        if self.s.central:
            self.rounds += 1
            with quiet_absl():
                self._acc.compose(self._event())
                self.epsilon = float(self._acc.get_epsilon(self.s.delta))
        else:
            for node in nodes:
                self.per_node[int(node)] = self.per_node.get(int(node), 0) + 1
            worst = max(self.per_node.values(), default=0)
            if worst:
                self.epsilon = self._local_epsilon(worst)
        return self.epsilon

    def _event(self):
        _, event_cls, *_ = _flower_accounting()
        cohort = self.s.num_clients if not self.s.central else self.s.cohort
        return event_cls(event_multiplier(self.s.noise_multiplier, self.s.mode, self.s.sampling),
                         cohort, self.s.num_clients)

    def _local_epsilon(self, count: int) -> float:
        if count not in self._cache:
            acc = new_accountant(self.s)
            with quiet_absl():
                acc.compose(self._event(), count)
                self._cache[count] = float(acc.get_epsilon(self.s.delta))
        return self._cache[count]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the accounting."""
        return {"rounds": self.rounds, "per_node": dict(self.per_node), "epsilon": self.epsilon,
                "accountant": self._acc.state_dict() if self.s.noise_multiplier > 0 else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.rounds = int(state["rounds"])
        self.per_node = {int(k): int(v) for k, v in dict(state["per_node"]).items()}
        self.epsilon = float(state["epsilon"])
        if state.get("accountant") is not None:
            with quiet_absl():
                self._acc.load_state_dict(dict(state["accountant"]))


def new_accountant(s: PrivacySettings):
    """A fresh Flower ``RdpAccountant`` for the mode and sampling of ``s``."""
    acc_cls, _, relation, config_cls, method = _flower_accounting()
    if not s.central:
        sampling, rel = method.NO_AMPLIFICATION, relation.ADD_OR_REMOVE_ONE
    elif s.sampling == "fixed":
        sampling, rel = method.WITHOUT_REPLACEMENT, relation.REPLACE_ONE
    elif s.cohort >= s.num_clients:  # Poisson with q = 1: every client every round
        sampling, rel = method.NO_AMPLIFICATION, relation.ADD_OR_REMOVE_ONE
    else:
        sampling, rel = method.POISSON, relation.ADD_OR_REMOVE_ONE
    return acc_cls(config_cls(target_delta=s.delta, population_size=s.num_clients,
                              neighboring_relation=rel, sampling_method=sampling))


def epsilon_after(s: PrivacySettings, rounds: int, noise_multiplier: float | None = None) -> float:
    """The epsilon of ``rounds`` releases (every client in all of them, for local DP)."""
    sigma = s.noise_multiplier if noise_multiplier is None else noise_multiplier
    return _epsilon_after(s.mode, s.sampling, s.num_clients, s.cohort, s.delta, int(rounds),
                          float(sigma))


@functools.lru_cache(maxsize=256)
def _epsilon_after(mode: str, sampling: str, num_clients: int, cohort: int, delta: float,
                   rounds: int, sigma: float) -> float:
    if sigma <= 0:
        return math.inf
    s = PrivacySettings(mode=mode, sampling=sampling, num_clients=num_clients, cohort=cohort,
                        delta=delta, noise_multiplier=sigma)
    acc = Accountant(s)
    with quiet_absl():
        acc._acc.compose(acc._event(), rounds)
        return float(acc._acc.get_epsilon(delta))


def calibrate(s: PrivacySettings, target_epsilon: float, rounds: int,
              max_noise_multiplier: float) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``rounds`` releases spend at most
    ``target_epsilon``; :class:`PrivacyConfigError` when even ``max_noise_multiplier`` spends
    more. ``target_epsilon = inf``: 0 (clipping, uniform weights, no noise)."""
    if math.isinf(target_epsilon):
        return 0.0
    hi = float(max_noise_multiplier)
    most = epsilon_after(s, rounds, hi)
    if most > target_epsilon:
        raise PrivacyConfigError(
            f"privacy.target_epsilon={target_epsilon:g} cannot be reached in num_rounds={rounds}"
            f" ({s.mode}, {s.sampling} sampling of {s.cohort}/{s.num_clients} clients, "
            f"delta={s.delta:.3g}): even privacy.max_noise_multiplier={hi:g} spends epsilon="
            f"{most:.4g}; allowed: a target >= {most:.4g}, fewer rounds, more clients, or a "
            f"larger max_noise_multiplier")
    lo = MIN_NOISE_MULTIPLIER
    if epsilon_after(s, rounds, lo) <= target_epsilon:
        return lo
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if epsilon_after(s, rounds, mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    if not epsilon_after(s, rounds, hi) > 0:  # delta alone covers the run: 0 says nothing
        raise PrivacyConfigError(
            f"privacy.target_epsilon={target_epsilon:g} cannot be accounted at delta="
            f"{s.delta:.3g} (the accountant reports epsilon 0 at noise multiplier {hi:.4g}: "
            "delta alone covers the run); allowed: a larger target_epsilon or a smaller "
            "privacy.delta")
    return hi


# ------------------------------------------------------------------------------ settings
def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise PrivacyConfigError(f"privacy.{key}={value!r} is not allowed; allowed: {allowed}")


def default_delta(num_clients: int) -> float:
    """``1 / n^1.1`` (at most 0.1): below ``1 / n``, as delta must be (Dwork & Roth 2014,
    sec. 2.3: a delta of order ``1 / n`` allows publishing some records in full)."""
    return min(float(num_clients) ** -DELTA_EXPONENT, 0.1)


def cohort_size(num_clients: int, fraction_train: float) -> int:
    """Clients sampled per round: ``max(int(num_clients * fraction_train), 1)`` (as fedrac's
    fixed-size sampling)."""
    return max(int(num_clients * float(fraction_train)), 1)


def settings_from_config(cfg: Mapping[str, Any]) -> PrivacySettings:
    """Check the ``privacy`` group of a composed run config and resolve the noise multiplier.

    Raises :class:`PrivacyConfigError` (one line) on the first value that cannot work,
    including a ``target_epsilon`` that cannot be reached within ``num_rounds`` and an
    ``aggregation`` rule whose sensitivity is not that of the clipped sum.
    """
    return _resolve(cfg.get("privacy") or {"mode": "none"}, cfg.get("num_clients"),
                    cfg.get("num_rounds"), cfg.get("fraction_train", 1.0),
                    cfg.get("aggregation"), cfg.get("model") or {})


def privacy_settings(settings: Settings) -> PrivacySettings:
    """The run's privacy settings (the noise multiplier a ``target_epsilon`` implies resolved)
    from its typed settings; the checks and their lines are those of
    :func:`settings_from_config`."""
    run = settings.run
    return _resolve(settings.privacy.privacy, run.num_clients, run.num_rounds,
                    run.fraction_train, settings.strategy.aggregation, settings.model.options)


def _resolve(privacy: Mapping[str, Any], num_clients: Any, num_rounds: Any,
             fraction_train: Any, aggregation: Mapping[str, Any] | None,
             model: Mapping[str, Any]) -> PrivacySettings:
    p = dict(privacy)
    mode = p.get("mode", "none")
    if mode not in MODES:
        _fail("mode", mode, ", ".join(MODES))
    if mode == "none":
        return PrivacySettings()
    n, rounds = int(num_clients), int(num_rounds)
    cohort = cohort_size(n, fraction_train)
    clip = p.get("clip_norm")
    if not (_num(clip) and math.isfinite(clip) and clip > 0):
        _fail("clip_norm", clip, "a number > 0 (the L2 bound of one client's update)")
    sigma = p.get("noise_multiplier")
    if sigma is not None and not (_num(sigma) and math.isfinite(sigma) and sigma >= 0):
        _fail("noise_multiplier", sigma, "null (set by target_epsilon) or a number >= 0")
    target = p.get("target_epsilon")
    if isinstance(target, str) and target.strip().lower() in ("inf", "infinity"):
        target = math.inf
    if target is not None and not (_num(target) and target > 0 and not math.isnan(target)):
        _fail("target_epsilon", target, "null, a number > 0, or inf (clipping without noise)")
    if sigma is None and target is None:
        _fail("noise_multiplier", sigma, "a number >= 0 when privacy.target_epsilon is null")
    delta = p.get("delta")
    delta = default_delta(n) if delta is None else delta
    if not (_num(delta) and 0 < delta < 1 and (n < 2 or delta < 1.0 / n)):
        _fail("delta", p.get("delta"), f"null (1 / num_clients^{DELTA_EXPONENT:g} = "
              f"{default_delta(n):.3g}) or a number in (0, {min(1.0, 1.0 / n):.3g}) (below "
              "1 / num_clients: a delta of 1 / n lets a mechanism publish one client's data "
              "in full)")
    sampling, clipping = p.get("sampling", "poisson"), p.get("clipping", "fixed")
    if sampling not in SAMPLINGS:
        _fail("sampling", sampling, ", ".join(SAMPLINGS))
    if clipping not in CLIPPINGS:
        _fail("clipping", clipping, ", ".join(CLIPPINGS))
    if mode == "local_dp" and clipping == "adaptive":
        _fail("clipping", clipping, "fixed with privacy=local_dp (adaptive clipping is central)")
    quantile, lr = p.get("target_quantile", 0.5), p.get("clip_lr", 0.2)
    if not (_num(quantile) and 0 < quantile < 1):
        _fail("target_quantile", quantile, "a number in (0, 1)")
    if not (_num(lr) and math.isfinite(lr) and lr > 0):
        _fail("clip_lr", lr, "a number > 0")
    count_std = p.get("clipped_count_stddev")
    if count_std is not None and not (_num(count_std) and math.isfinite(count_std)
                                      and count_std > 0):
        _fail("clipped_count_stddev", count_std, "null (cohort / 20) or a number > 0")
    max_sigma = p.get("max_noise_multiplier", 100.0)
    if not (_num(max_sigma) and math.isfinite(max_sigma) and max_sigma > MIN_NOISE_MULTIPLIER):
        _fail("max_noise_multiplier", max_sigma, f"a number > {MIN_NOISE_MULTIPLIER:g}")
    check_aggregation(aggregation, mode)
    if mode == "local_dp" and model.get("name") == "hf" and \
            model.get("trainable_modules", "auto") not in ([], None, "none"):
        _fail("mode", mode, "dp with model=hf (local DP noises only the factors, not the "
              "trained modules such as the new head), or model.trainable_modules=[]")
    s = PrivacySettings(mode=mode, clip_norm=float(clip), delta=float(delta),
                        target_epsilon=None if target is None else float(target),
                        sampling=sampling, clipping=clipping, target_quantile=float(quantile),
                        clip_lr=float(lr), num_clients=n, cohort=cohort, num_rounds=rounds,
                        clipped_count_stddev=None if count_std is None else float(count_std))
    if clipping == "adaptive":  # the update's noise is split off sigma: sigma < 2 * count std
        max_sigma = min(max_sigma, 2 * adaptive_count_std(s) * (1 - 1e-9))
    if sigma is None:
        sigma = calibrate(s, float(target), rounds, max_sigma)
    else:
        if clipping == "adaptive" and sigma >= max_sigma:
            _fail("noise_multiplier", sigma, f"< 2 * clipped_count_stddev = {max_sigma:.4g} with "
                  "clipping=adaptive (raise privacy.clipped_count_stddev)")
        if target is not None:
            spent = epsilon_after(s, rounds, float(sigma))
            if spent > target:
                raise PrivacyConfigError(
                    f"privacy.target_epsilon={target:g} cannot be reached in num_rounds={rounds}"
                    f" with privacy.noise_multiplier={sigma:g} (it spends epsilon={spent:.4g}); "
                    "allowed: noise_multiplier=null (calibrated to the target), more noise or "
                    "fewer rounds")
    return PrivacySettings(**{**s.__dict__, "noise_multiplier": float(sigma)})


def check_aggregation(agg: Mapping[str, Any] | None, mode: str) -> None:
    """Central DP needs the plain sum: refuse robust rules that break its sensitivity bound.

    ``median`` / ``trimmed_mean`` (order statistics: one client moves every coordinate's
    choice), ``norm_clip`` and relative ``max_update_norm`` bounds (a bound set by the other
    clients' norms) are refused; ``mean`` with an absolute or no norm bound is fine.
    """
    if mode != "dp" or not agg:
        return
    name = agg.get("name", "mean")
    if name != "mean":
        raise PrivacyConfigError(
            f"aggregation={name} is not allowed with privacy=dp (its output moves by more than "
            "clip_norm / cohort when one client changes, so the noise would not cover it); "
            "allowed: aggregation=mean")
    bound = agg.get("max_update_norm")
    if isinstance(bound, str) and bound != "default":
        raise PrivacyConfigError(
            f"aggregation.max_update_norm={bound!r} is not allowed with privacy=dp (a bound "
            "relative to the round's median norm depends on the other clients); allowed: null "
            "or an absolute number")


def adaptive_count_std(s: PrivacySettings) -> float:
    """Noise std of adaptive clipping's clipped count (default: cohort / 20, as Flower)."""
    return s.clipped_count_stddev if s.clipped_count_stddev is not None else s.cohort / 20


# --------------------------------------------------------------------------- the rule
def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """``||u||_2`` over all tensors of one client's update (float64)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.to(torch.float64))) ** 2
                         for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float
                ) -> tuple[dict[str, torch.Tensor], float]:
    """``u * min(1, C / ||u||)`` in float64 (FlatClip) and the norm before clipping."""
    norm = update_norm(update)
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: t.to(torch.float64) * factor for k, t in update.items()}, norm


def gaussian_noise(shapes: Mapping[str, tuple[int, ...]], std: float, seed: int
                   ) -> dict[str, torch.Tensor]:
    """i.i.d. ``N(0, std^2)`` per entry (float64), drawn on the CPU from ``seed`` in key order."""
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return {k: torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * std
            for k, shape in sorted(shapes.items())}


def differences(values: Sequence[Mapping[str, torch.Tensor]],
                reference: Mapping[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
    """Each client's update: ``values - reference`` (``reference`` None: zero), float64."""
    out = []
    for v in values:
        out.append({k: t.to(torch.float64) - (0 if reference is None
                                               else reference[k].to(torch.float64))
                    for k, t in v.items()})
    return out


def private_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], clip_norm: float, noise_multiplier: float,
    denominator: int, seed: int,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The central DP rule: ``(sum_k clip(u_k) + N(0, (sigma C)^2 I)) / m`` per key (float64),
    and the clients' norms before clipping. Pure: the noise comes from ``seed``."""
    first = updates[0]
    total = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in first.items()}
    norms = []
    for u in updates:
        clipped, norm = clip_update(u, clip_norm)
        norms.append(norm)
        for k, t in clipped.items():
            total[k] += t
    if noise_multiplier > 0:
        noise = gaussian_noise({k: tuple(t.shape) for k, t in total.items()},
                               noise_multiplier * clip_norm, seed)
        for k in total:
            total[k] += noise[k]
    return {k: t / float(denominator) for k, t in total.items()}, norms


def privatize_update(
    values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None,
    clip_norm: float, noise_multiplier: float, seed: int,
) -> dict[str, torch.Tensor]:
    """Local DP on one client: ``reference + clip(values - reference) + N(0, (sigma C)^2 I)``,
    in each tensor's dtype (floating tensors only; others pass unchanged)."""
    floating = {k: v for k, v in values.items() if v.is_floating_point()}
    (update,) = differences([floating], None if reference is None else
                            {k: reference[k] for k in floating})
    clipped, _ = clip_update(update, clip_norm)
    noise = gaussian_noise({k: tuple(t.shape) for k, t in clipped.items()},
                           noise_multiplier * clip_norm, seed) if noise_multiplier > 0 else {}
    out = dict(values)
    for k, t in clipped.items():
        base = 0 if reference is None else reference[k].to(torch.float64)
        out[k] = (base + t + noise.get(k, 0)).to(values[k].dtype)
    return out


class CentralDP:
    """The server's DP state of a run: the clip norm (adaptive or fixed) and the accountant."""

    def __init__(self, settings: PrivacySettings, run_seed: int) -> None:
        self.s, self.run_seed = settings, int(run_seed)
        self.clip_norm = settings.clip_norm
        self.accountant = Accountant(settings)
        self.update_sigma, self.count_std = settings.noise_multiplier, 0.0
        if settings.clipping == "adaptive" and settings.noise_multiplier > 0:
            from flwr.supercore.differential_privacy import compute_adaptive_noise_params

            self.count_std, self.update_sigma = compute_adaptive_noise_params(
                settings.noise_multiplier, settings.cohort, adaptive_count_std(settings))

    def aggregate(
        self, server_round: int, values: Sequence[Mapping[str, torch.Tensor]],
        reference: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """``reference + private_mean(values - reference)`` in the reference's (else the
        values') dtypes; composes the round's release and adapts the clip norm."""
        from fedrac.adapters.sketch import derive_seed

        clip = self.clip_norm
        mean, norms = private_mean(differences(values, reference), clip, self.update_sigma,
                                   self.s.cohort, derive_seed(self.run_seed, server_round,
                                                              NOISE_STREAM))
        self.last_norms = sorted(norms)
        from flwr.supercore import log

        log(logging.INFO, "round %d: DP update norms median %.4g (max %.4g), %d of %d clipped to "
            "%.4g", server_round, self.last_norms[len(norms) // 2], self.last_norms[-1],
            sum(n > clip for n in norms), len(norms), clip)
        if self.s.clipping == "adaptive":
            self.clip_norm = self._adapted(server_round, norms, clip)
        self.accountant.release()
        out = {}
        for k, t in mean.items():
            like = values[0][k] if reference is None else reference[k]
            base = 0 if reference is None else reference[k].to(torch.float64)
            out[k] = (base + t).to(like.dtype)
        return out

    def _adapted(self, server_round: int, norms: Sequence[float], clip: float) -> float:
        """Andrew et al.: ``C <- C * exp(-lr * (b - quantile))``, ``b`` the noised share of
        clients whose norm was at most C (the count noised with ``count_std``)."""
        from fedrac.adapters.sketch import derive_seed

        count = float(sum(1 for n in norms if n <= clip))
        if self.count_std > 0:
            gen = torch.Generator().manual_seed(
                derive_seed(self.run_seed, server_round, COUNT_STREAM))
            count += float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_std
        share = count / self.s.cohort
        return clip * math.exp(-self.s.clip_lr * (share - self.s.target_quantile))

    def round_metrics(self) -> dict[str, float]:
        """``epsilon`` spent so far and the ``clip_norm`` the next round uses."""
        return {"epsilon": self.accountant.epsilon, "clip_norm": self.clip_norm}
