"""Client-level DP: clipping bounds every client, the noise and the accountant are as stated,
the factor methods still merge exactly, and bad privacy settings stop the run in one line."""

import math

import pytest
import torch
from flwr.app import ArrayRecord

from fedrac.adapters import LayerSpec
from fedrac.adapters.sketch import derive_seed, make_sketch
from fedrac.privacy.dp import (
    NOISE_STREAM,
    CentralDP,
    PrivacySettings,
    calibrate,
    epsilon_after,
    private_mean,
    privatize_update,
    settings_from_config,
)
from fedrac.settings.config import ConfigError
from strategies.fedavg import FedAvgFPFT
from strategies.ffa_lora import FFALoRA
from strategies.rac_lora import RacLoRA
from tests.helpers import reply, run_strategy

LAYERS = {"rect": LayerSpec("rect", (7, 5)), "sq": LayerSpec("sq", (6, 6))}
RANK, ALPHA, SEED = 2, 3.0, 11


def _cfg(**privacy) -> dict:
    p = {"mode": "dp", "target_epsilon": None, "noise_multiplier": 1.0, "delta": None,
         "clip_norm": 1.0, "clipping": "fixed", "target_quantile": 0.5, "clip_lr": 0.2,
         "clipped_count_stddev": None, "sampling": "poisson", "max_noise_multiplier": 100}
    p.update(privacy)
    return {"privacy": p, "num_clients": 10, "num_rounds": 20, "fraction_train": 1.0}


def _settings(**kw) -> PrivacySettings:
    base = {"mode": "dp", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5,
            "num_clients": 100, "cohort": 10, "num_rounds": 10}
    base.update(kw)
    return PrivacySettings(**base)


def _adversarial(gen: torch.Generator, shapes: dict) -> dict:
    """An update built to break a bound: huge, tiny, one spike, or all mass in one tensor."""
    kind = int(torch.randint(0, 5, (), generator=gen))
    out = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    if kind == 0:
        out = {k: v * 1e12 for k, v in out.items()}
    elif kind == 1:
        out = {k: v * 1e-12 for k, v in out.items()}
    elif kind == 2:
        first = next(iter(out))
        out = {k: torch.zeros_like(v) for k, v in out.items()}
        out[first].view(-1)[0] = 1e30
    elif kind == 3:
        out = {k: torch.zeros_like(v) for k, v in out.items()}
    return out


def _norm(t: dict) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in t.values()))


# -------------------------------------------------------------------------------- clipping
def test_clipping_bounds_every_clients_contribution_against_adversarial_updates():
    shapes = {"a": (3, 4), "b": (5,)}
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        clip, m = float(torch.rand((), generator=gen)) * 5 + 0.01, int(torch.randint(1, 8, ()))
        others = [_adversarial(gen, shapes) for _ in range(m - 1)]
        target, replacement = _adversarial(gen, shapes), _adversarial(gen, shapes)
        with_k, _ = private_mean(others + [target], clip, 0.0, m, seed=trial)
        without_k, _ = private_mean(others + [{k: torch.zeros(s) for k, s in shapes.items()}],
                                    clip, 0.0, m, seed=trial)
        replaced, norms = private_mean(others + [replacement], clip, 0.0, m, seed=trial)
        diff = {k: with_k[k] - without_k[k] for k in shapes}
        assert _norm(diff) <= clip / m * (1 + 1e-9), trial  # add / remove one client
        assert _norm({k: with_k[k] - replaced[k] for k in shapes}) <= 2 * clip / m * (1 + 1e-9)
        assert _norm(with_k) <= clip * (1 + 1e-9)  # the mean of m clipped updates
        assert len(norms) == m


def test_fedavg_under_dp_moves_the_global_weights_by_at_most_clip_norm():
    """End to end through the strategy: a client sending absurd weights moves W by <= C."""
    initial = {"w": torch.randn(4, 3), "b": torch.zeros(3)}

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        scale = 1e9 if pid == 0 else 0.01
        return reply(msg, "arrays", {k: (v + scale).numpy() for k, v in initial.items()},
                     num_examples=10 ** (pid + 3))  # claims buy nothing: weights are uniform

    strategy = FedAvgFPFT(run_seed=SEED,
                          privacy=settings_from_config({**_cfg(noise_multiplier=0.0),
                                                        "num_clients": 4}))
    seen = run_strategy(strategy, ArrayRecord(initial), 1, 4, train)
    new = seen[-1].to_torch_state_dict()
    step = {k: new[k].double() - initial[k].double() for k in initial}
    assert _norm(step) <= 1.0 * (1 + 1e-6)
    assert _norm(step) > 0.25  # the absurd client is clipped to C, not dropped: C/4 from it


def test_fewer_replies_than_the_cohort_are_divided_by_the_expected_cohort():
    """Poisson sampling or a dropout: 2 replies of an expected 5 still average over 5, so
    one client moves the mean by at most C/5 whatever the number that came back."""
    ups = [{"x": torch.tensor([3.0, 4.0])}, {"x": torch.tensor([0.3, 0.4])}]  # norms 5, 0.5
    mean, norms = private_mean(ups, 1.0, 0.0, 5, seed=0)
    assert torch.allclose(mean["x"], torch.tensor([0.6 + 0.3, 0.8 + 0.4], dtype=torch.float64) / 5)
    assert norms == pytest.approx([5.0, 0.5])


# ----------------------------------------------------------------------------- the noise
def test_noise_on_the_sum_has_std_noise_multiplier_times_clip_norm_over_the_cohort():
    sigma, clip, m = 1.7, 0.4, 8
    zeros = [{"x": torch.zeros(200_000)} for _ in range(m)]
    mean, _ = private_mean(zeros, clip, sigma, m, seed=123)
    std = float(mean["x"].std())
    expected = sigma * clip / m
    assert abs(std / expected - 1) < 0.01  # 200k draws: the estimate is within ~0.3 %
    assert abs(float(mean["x"].mean())) < 5 * expected / math.sqrt(200_000)
    again, _ = private_mean(zeros, clip, sigma, m, seed=123)
    assert torch.equal(mean["x"], again["x"])  # seeded: reproducible


def test_local_dp_clips_and_noises_around_the_clients_start():
    start = {"w": torch.full((50_000,), 3.0), "steps": torch.tensor(7)}
    trained = {"w": start["w"] + 100.0, "steps": torch.tensor(9)}
    out = privatize_update(trained, start, clip_norm=2.0, noise_multiplier=0.0, seed=1)
    assert _norm({"w": out["w"] - start["w"]}) == pytest.approx(2.0, rel=1e-6)
    assert out["steps"] == 9  # integer buffers pass through
    noisy = privatize_update(trained, start, clip_norm=2.0, noise_multiplier=3.0, seed=1)
    resid = noisy["w"].double() - out["w"].double()
    assert float(resid.std()) == pytest.approx(6.0, rel=0.02)


# --------------------------------------------------------------------------- accounting
def test_accountant_matches_the_analytic_gaussian_mechanism():
    """sigma = 4.530877117 is exactly (1, 1e-6)-DP for one Gaussian release (Balle & Wang
    2018; the value dp-accounting's own tests use). q = 1 (every client every round)."""
    s = _settings(num_clients=10, cohort=10, delta=1e-6)
    assert epsilon_after(s, 1, 4.530877117) == pytest.approx(1.0, abs=1e-3)
    # T Gaussian releases of sigma*sqrt(T) compose to one of sigma (RDP is additive)
    assert epsilon_after(s, 100, 45.30877117) == pytest.approx(1.0, abs=1e-3)
    # fixed-size sampling of everyone: replace-one doubles the sensitivity (sigma / 2)
    fixed = _settings(num_clients=10, cohort=10, delta=1e-6, sampling="fixed")
    assert epsilon_after(fixed, 1, 2 * 4.530877117) == pytest.approx(1.0, abs=1e-2)


def test_accounting_leaves_the_root_logger_alone():
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    root.handlers.clear()
    try:
        epsilon_after(_settings(num_clients=100, cohort=10), 5, 0.5)  # warns inside absl
        assert root.handlers == []
    finally:
        root.handlers[:] = before


def test_accountant_poisson_matches_dp_accounting_and_amplifies():
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    s = _settings(num_clients=100, cohort=10, delta=1e-5)
    ref = rdp_privacy_accountant.RdpAccountant()
    ref.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.3)), 50)
    assert epsilon_after(s, 50, 1.3) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    everyone = _settings(num_clients=10, cohort=10, delta=1e-5)
    assert epsilon_after(s, 50, 1.3) < epsilon_after(everyone, 50, 1.3) / 3


def test_epsilon_per_round_grows_to_the_target_picked_by_calibration():
    s = _settings(num_clients=50, cohort=10, delta=0.02, num_rounds=30)
    sigma = calibrate(s, 3.0, 30, 100.0)
    assert epsilon_after(s, 30, sigma) <= 3.0 < epsilon_after(s, 30, sigma / 1.01)
    dp = CentralDP(PrivacySettings(**{**s.__dict__, "noise_multiplier": sigma}), SEED)
    eps = [dp.accountant.release() for _ in range(30)]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == pytest.approx(epsilon_after(s, 30, sigma), rel=1e-9)


# ------------------------------------------------------------------- exactness under DP
@pytest.mark.parametrize("cls", [RacLoRA, FFALoRA])
def test_noised_mean_of_the_trained_factor_is_merged_exactly(cls):
    """W' - W = s B_bar A (or s B A_bar) with B_bar the noised mean, to float32 rounding:
    the noise lives in the factor's space, so the merged update keeps rank <= r."""
    side = "B"
    gen = torch.Generator().manual_seed(5)
    initial = {f"{n}.weight": torch.randn(*s.weight_shape, generator=gen)
               for n, s in LAYERS.items()}
    factors = {pid: {f"{n}.lora_{side}": torch.randn(*s.factor_shape(side, RANK), generator=gen)
                     for n, s in LAYERS.items()} for pid in range(4)}

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        return reply(msg, "factors", {k: v.numpy() for k, v in factors[pid].items()}, 5 + pid)

    settings = settings_from_config({**_cfg(noise_multiplier=2.0, clip_norm=1.5),
                                     "num_clients": 4})
    strategy = cls(layers=LAYERS, rank=RANK, alpha=ALPHA, sketch="gaussian", train_factor=side,
                   run_seed=SEED, privacy=settings)
    seen = run_strategy(strategy, ArrayRecord(initial), 1, 4, train)
    merged = seen[-1].to_torch_state_dict()
    mean, _ = private_mean([factors[p] for p in range(4)], 1.5, 2.0, 4,
                           derive_seed(SEED, 1, NOISE_STREAM))
    seed = strategy.round_seed(1)
    for n, s in LAYERS.items():
        a = make_sketch(seed, f"{n}.lora_A", s.factor_shape("A", RANK), "gaussian").double()
        b_bar = mean[f"{n}.lora_B"].float().double()  # the factor travels as float32
        expected = initial[f"{n}.weight"].double() + ALPHA / RANK * b_bar @ a
        delta = merged[f"{n}.weight"].double() - initial[f"{n}.weight"].double()
        assert torch.allclose(merged[f"{n}.weight"].double(), expected, atol=1e-5, rtol=0)
        assert torch.linalg.matrix_rank(delta, atol=1e-4) <= RANK
        noise_free = sum(factors[p][f"{n}.lora_B"].double() for p in range(4)) / 4
        assert not torch.allclose(b_bar, noise_free, atol=1e-2)  # the noise is really there


# ------------------------------------------------------------------------------ bad input
BAD = [
    ({"noise_multiplier": -0.5}, "privacy.noise_multiplier=-0.5 is not allowed; allowed: null "),
    ({"clip_norm": 0}, "privacy.clip_norm=0 is not allowed; allowed: a number > 0"),
    ({"clip_norm": -1.0}, "privacy.clip_norm=-1.0 is not allowed; allowed: a number > 0"),
    ({"noise_multiplier": None, "target_epsilon": 1e-4, "delta": 1e-5},
     "privacy.target_epsilon=0.0001 cannot be reached in num_rounds=20"),
    ({"noise_multiplier": 0.5, "target_epsilon": 1.0},
     "privacy.target_epsilon=1 cannot be reached in num_rounds=20 with "
     "privacy.noise_multiplier=0.5"),
    ({"sampling": "shuffle"}, "privacy.sampling='shuffle' is not allowed; allowed: poisson, fixed"),
    ({"mode": "secret"}, "privacy.mode='secret' is not allowed; allowed: none, dp, local_dp"),
    ({"delta": 1.5}, "privacy.delta=1.5 is not allowed; allowed: null (1 / num_clients^1.1"),
    ({"delta": 0.1}, "privacy.delta=0.1 is not allowed; allowed: null (1 / num_clients^1.1 "
                     "= 0.0794) or a number in (0, 0.1)"),
    ({"noise_multiplier": None, "target_epsilon": 1e-9},
     "privacy.target_epsilon=1e-09 cannot be accounted at delta=0.0794"),
    ({"clipping": "adaptive", "noise_multiplier": 5.0},
     "privacy.noise_multiplier=5.0 is not allowed; allowed: < 2 * clipped_count_stddev"),
]


@pytest.mark.parametrize(("privacy", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_privacy_settings_raise_one_line(privacy, message):
    with pytest.raises(ConfigError) as err:
        settings_from_config(_cfg(**privacy))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(("agg", "message"), [
    ({"name": "median"}, "aggregation=median is not allowed with privacy=dp"),
    ({"name": "trimmed_mean"}, "aggregation=trimmed_mean is not allowed with privacy=dp"),
    ({"name": "norm_clip"}, "aggregation=norm_clip is not allowed with privacy=dp"),
    ({"name": "mean", "max_update_norm": "auto"},
     "aggregation.max_update_norm='auto' is not allowed with privacy=dp"),
])
def test_dp_refuses_a_robust_aggregator_that_breaks_its_sensitivity_bound(agg, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_config({**_cfg(), "aggregation": agg})
    settings_from_config({**_cfg(), "aggregation": {"name": "mean", "max_update_norm": 5.0}})
    settings_from_config({**_cfg(mode="local_dp"), "aggregation": agg})  # local: post-processing


@pytest.mark.parametrize(("args", "message"), [
    (["privacy=dp", "privacy.clip_norm=0"], "privacy.clip_norm=0 is not allowed"),
    (["privacy=dp", "privacy.noise_multiplier=-1", "privacy.target_epsilon=null"],
     "privacy.noise_multiplier=-1 is not allowed"),
    (["privacy=dp", "privacy.target_epsilon=0.001", "num_rounds=500"],
     "privacy.target_epsilon=0.001 cannot be reached in num_rounds=500"),
    (["privacy=local_dp", "privacy.clipping=adaptive"], "privacy.clipping='adaptive' is not"),
])
def test_bad_privacy_input_from_the_command_line_exits_2_with_one_line(args, message, tmp_path,
                                                                       monkeypatch, capsys):
    from tests.helpers import cli_error

    err = cli_error(args, tmp_path, monkeypatch, capsys)
    assert len(err) == 1 and err[0].startswith("fedrac: error: ") and message in err[0], err


def test_default_delta_is_below_one_over_the_number_of_clients():
    from fedrac.privacy.dp import settings_from_config

    s = settings_from_config(_cfg())
    assert s.delta == pytest.approx(10 ** -1.1) and s.delta < 1 / 10


def test_local_dp_refuses_trained_modules_it_would_not_noise():
    from fedrac.privacy.dp import settings_from_config

    cfg = {**_cfg(mode="local_dp"), "model": {"name": "hf", "trainable_modules": "auto"}}
    with pytest.raises(ConfigError, match="privacy.mode='local_dp' is not allowed; allowed: dp"):
        settings_from_config(cfg)
    settings_from_config({**cfg, "model": {"name": "hf", "trainable_modules": []}})


@pytest.mark.parametrize("privacy", [{"target_epsilon": 4.0, "noise_multiplier": None},
                                     {"mode": "local_dp", "fraction_train": 0.5}])
def test_the_typed_settings_resolve_the_same_privacy_as_the_config(privacy):
    """privacy_settings(settings) (what the strategy and a local-DP client use) equals
    settings_from_config(cfg) (the check): clients, rounds and the sampled fraction each read
    from their own key."""
    from fedrac.privacy.dp import privacy_settings, settings_from_config
    from tests.helpers import settings_with

    fraction = privacy.pop("fraction_train", 0.3)
    cfg = {**_cfg(**privacy), "num_clients": 40, "num_rounds": 7, "fraction_train": fraction}
    typed = privacy_settings(settings_with(**cfg))
    assert typed == settings_from_config(cfg)
    assert (typed.num_clients, typed.num_rounds, typed.cohort) == (40, 7, int(40 * fraction))
