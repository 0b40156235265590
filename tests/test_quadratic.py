"""The theory_quadratic experiment's runner: the paper's claims on a least-squares toy."""

import math

import pytest
from hydra import compose, initialize_config_dir

from fedrac.experiments.quadratic import run_quadratic
from fedrac.settings.config import conf_dir, validate

ROUNDS = 30


def _run(tmp_path, strategy: str, clients: int, steps: int = 1, **extra) -> float:
    overrides = [f"strategy={strategy}", f"num_clients={clients}", f"num_rounds={ROUNDS}",
                 f"client.local_steps={steps}", "+experiment=theory_quadratic"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=overrides))
    cfg["output_dir"] = str(tmp_path / f"{strategy}-{clients}-{steps}")
    return run_quadratic(cfg)["final_distance"]


def _fixed_subspace_best(clients: int = 4) -> float:
    """The relative distance to W* of the best W = B A_0 over B (FFA-LoRA's stall point)."""
    import torch

    from fedrac.adapters.sketch import derive_seed, make_sketch
    from fedrac.experiments.quadratic import DEFAULTS, make_problem

    w_star, xs, _, _ = make_problem(DEFAULTS, clients)
    x = torch.cat(xs)
    cov = x.T @ x / len(x)
    a = make_sketch(derive_seed(0, 0), "lin.lora_A", (1, DEFAULTS["d_in"]),
                    "orthogonal").double()
    b = w_star @ cov @ a.T @ torch.linalg.inv(a @ cov @ a.T)
    return float(torch.linalg.norm(b @ a - w_star) / torch.linalg.norm(w_star))


def test_rac_lora_moves_towards_the_optimum_and_a_fixed_sketch_stalls(tmp_path):
    fpft, rac, ffa = (_run(tmp_path, s, 4) for s in ("fedavg", "rac_lora", "ffa_lora"))
    best = _fixed_subspace_best()
    assert fpft < 0.1
    # the fixed sketch converges to, and stays at, its subspace's best point (not beyond, not
    # diverging); the fresh sketches leave it far behind
    assert best - 1e-9 <= ffa < best + 1e-3
    assert rac < best - 0.2


def test_one_local_step_makes_federated_exact_methods_equal_to_centralized(tmp_path):
    assert math.isclose(_run(tmp_path, "rac_lora", 1), _run(tmp_path, "rac_lora", 4),
                        rel_tol=1e-6)


@pytest.mark.parametrize("strategy", ["fedit"])
def test_lora_with_both_factors_diverges_at_step_one_over_l(tmp_path, strategy):
    final = _run(tmp_path, strategy, 1)
    assert not final < 1e3  # diverged (a FedIT that did nothing would stay at 1.0)


def test_the_toy_loads_no_dataset_and_checks_the_rank_against_its_own_layer(tmp_path,
                                                                              monkeypatch):
    import fedrac.data

    def no_data(*a, **k):
        raise AssertionError("the quadratic experiment loaded a dataset")

    monkeypatch.setattr(fedrac.data, "load_splits", no_data)
    _run(tmp_path, "fedavg", 1)  # validate() and the run: no dataset
    from fedrac.settings.config import ConfigError

    with pytest.raises(ConfigError, match=r"strategy.rank=7 is larger than layer 'lin' \(8->6\)"):
        _run(tmp_path, "rac_lora", 1, **{"strategy.rank": 7})


@pytest.mark.slow  # six 30-round runs (about a minute)
def test_projected_step_makes_gaussian_and_rademacher_sketches_follow_the_analysis(tmp_path):
    """s = alpha/r = 0.5 (not 1), the real client path, rank 2, step 4/L (so eta s^2 = 1/L):
    with ``client.projected_step`` a gaussian or rademacher sketch converges like the
    orthogonal one (measured after 30 rounds: orthogonal 0.483 with or without it; gaussian
    0.526 -> 0.475, rademacher 0.515 -> 0.490); for the orthogonal sketch it changes nothing."""
    common = {"strategy.rank": 2, "strategy.alpha": 1, "quadratic.step": 4.0}

    def final(sketch: str, projected: bool) -> float:
        return _run(tmp_path / f"{sketch}-{projected}", "rac_lora", 4, **common,
                    **{"strategy.sketch": sketch, "client.projected_step": projected})

    ortho = final("orthogonal", False)
    assert ortho < 0.5
    assert math.isclose(final("orthogonal", True), ortho, rel_tol=1e-6)
    for sketch in ("gaussian", "rademacher"):
        plain, projected = final(sketch, False), final(sketch, True)
        assert projected < 0.5 < plain, (sketch, plain, projected)


def test_projected_step_is_refused_for_two_factor_methods(tmp_path):
    from fedrac.settings.config import ConfigError

    with pytest.raises(ConfigError, match=r"client.projected_step=True is not allowed; allowed: "
                                          r"false for strategy fedit"):
        _run(tmp_path, "fedit", 1, **{"client.projected_step": True})
