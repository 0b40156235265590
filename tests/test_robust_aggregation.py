"""The aggregation rules on hand-computed cases, the reply screen, and what stays exact.

Fed-RAC-LoRA stays exact under every rule because the sketch is shared: each client's merge
``W + s B_k A`` is a point of one subspace whose coordinates are the trained factor, and the
server's ``W + s rule(B_k) A`` is the rule applied in those coordinates. FedIT applies the
rule to each factor and multiplies: ``rule(B) rule(A) != rule(B A)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from hydra import compose, initialize_config_dir

from fedrac.adapters import LayerSpec
from fedrac.adapters.sketch import derive_seed, make_sketch
from fedrac.settings.config import ConfigError, conf_dir, validate
from fedrac.settings.typed import settings_of
from strategies import STRATEGIES, build_aggregator
from strategies.aggregation import RULES, Aggregator, normalised, parse_bound
from tests.helpers import reply, run_strategy, settings_with


def _agg(name: str, **kw) -> Aggregator:
    return Aggregator(name, max_client_weight=None, **kw)


def _combine(name: str, values: list[float] | list[list[float]], weights=None, ref=None,
             **kw) -> torch.Tensor:
    vals = [{"x": torch.tensor(v, dtype=torch.float64)} for v in values]
    reference = None if ref is None else {"x": torch.tensor(ref, dtype=torch.float64)}
    weights = weights or [1.0] * len(values)
    return _agg(name, max_update_norm=None, **kw).aggregate(1, vals, weights, reference)["x"]


# ------------------------------------------------------------------ hand-computed rules
def test_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones():
    assert _combine("median", [[1.0, -3.0], [5.0, 0.0], [2.0, 9.0]]).tolist() == [2.0, 0.0]
    assert _combine("median", [1.0, 4.0, 2.0, 10.0]).item() == 3.0
    # unweighted: a client claiming many examples gets no more say
    assert _combine("median", [1.0, 4.0, 2.0], weights=[1e6, 1, 1]).item() == 2.0
    # translation-equivariant: on updates against a reference, the same point
    assert _combine("median", [11.0, 15.0, 12.0], ref=10.0).item() == 12.0


def test_trimmed_mean_drops_floor_fraction_times_n_at_each_end():
    assert _combine("trimmed_mean", [0.0, 1.0, 2.0, 3.0, 100.0], trim_fraction=0.2).item() == 2.0
    assert _combine("trimmed_mean", [1.0, 4.0, 2.0, 100.0], trim_fraction=0.25).item() == 3.0
    # 0.1 of 5 clients trims none: the plain (unweighted) mean
    assert _combine("trimmed_mean", [0.0, 1.0, 2.0, 3.0, 9.0], weights=[9, 1, 1, 1, 1],
                    trim_fraction=0.1).item() == 3.0
    # per coordinate: each coordinate trims its own extremes
    got = _combine("trimmed_mean", [[0.0, 50.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0],
                                    [-90.0, 4.0]], trim_fraction=0.2)
    assert got.tolist() == [1.0, 3.0]


def test_norm_clip_scales_each_update_to_the_median_norm_then_takes_the_weighted_mean():
    agg = _agg("norm_clip", max_update_norm=None)
    values = [{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([0.0, 2.0])},
              {"x": torch.tensor([6.0, 8.0])}]  # norms 1, 2, 10: median 2
    kept, weights, scales = agg.screen(1, [1, 2, 3], values, [1.0, 1.0, 2.0], None)
    assert kept == [0, 1, 2] and scales == [1.0, 1.0, 0.2]
    clipped = [{"x": v["x"] * s} for v, s in zip(values, scales, strict=True)]
    got = agg.aggregate(1, clipped, weights)["x"]
    torch.testing.assert_close(got, torch.tensor([0.25 * 1 + 0.5 * 1.2, 0.25 * 2 + 0.5 * 1.6]))


def test_mean_weights_never_overflow():
    p = normalised([1e308, 1e308, 1.0])
    assert torch.isfinite(p).all() and p[:2].tolist() == [0.5, 0.5]
    assert _combine("mean", [2.0, 4.0], weights=[1e308, 1e308]).item() == 3.0
    with pytest.raises(ValueError):
        normalised([1.0, float("inf")])


def test_integer_tensors_round_back_to_their_dtype():
    agg = _agg("mean", max_update_norm=None)
    vals = [{"n": torch.tensor([3], dtype=torch.int64)}, {"n": torch.tensor([4])}]
    out = agg.aggregate(1, vals, [1.0, 1.0], {"n": torch.tensor([3])})["n"]
    assert out.dtype == torch.int64 and out.item() == 4  # 3.5 rounds half to even


# ------------------------------------------------------------------------- the screen
def test_screen_caps_claims_and_drops_updates_over_the_bound(caplog):
    agg = Aggregator("mean", max_update_norm="3x", max_client_weight=100)
    values = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([1.5])}, {"x": torch.tensor([9.0])},
              {"x": torch.tensor([-1.0])}]  # norms 1, 1.5, 9, 1: median 1.25, bound 3.75
    with caplog.at_level("INFO"):
        kept, weights, scales = agg.screen(4, [10, 11, 12, 13], values, [5, 1e30, 7, 8], None)
    assert kept == [0, 1, 3] and weights == [5, 100, 8] and scales == [1.0] * 3
    text = caplog.text
    assert "node 11 claims num-examples=1e+30; counted as 100" in text
    assert "reply of node 12 dropped: update norm 9 exceeds aggregation.max_update_norm=3x" in text
    # auto (relative) weight cap without a known partition size: 10x the median claim
    rel = Aggregator("mean", max_client_weight="auto")
    _, weights, _ = rel.screen(1, [1, 2, 3], values[:3], [10, 20, 1e9], None)
    assert weights == [10, 20, 200]


def test_norm_bound_measures_the_update_not_the_weights():
    agg = Aggregator("mean", max_update_norm=1.0, max_client_weight=None)
    ref = {"x": torch.tensor([100.0, 0.0])}
    values = [{"x": torch.tensor([100.5, 0.0])}, {"x": torch.tensor([100.0, 2.0])}]
    kept, _, _ = agg.screen(1, [1, 2], values, [1, 1], ref)
    assert kept == [0]


def test_defaults_follow_the_rule():
    # mean: 10x the round's median norm by default (issue 20: an unbounded mean was wrecked by
    # one client x1e20); off under privacy=dp and secagg=plus, which see no relative bound
    assert Aggregator("mean").max_update_norm == "10x"
    base = {"aggregation": {"name": "mean", "max_update_norm": "default"}, "seed": 0,
            "engine": {"name": "deployment"}}
    assert build_aggregator(settings_with(**base)).max_update_norm == "10x"
    assert build_aggregator(settings_with(**base, privacy={"mode": "dp"})).max_update_norm is None
    assert build_aggregator(settings_with(**base, secagg={"name": "plus"})).max_update_norm is None
    for name in ("median", "trimmed_mean", "norm_clip"):
        assert Aggregator(name).max_update_norm == "10x"
    assert parse_bound("auto", "k") == "10x" and parse_bound(2, "k") == 2.0
    for bad in (0, -1, "big", "0.5x", float("nan"), True):
        with pytest.raises(ValueError, match="aggregation.k="):
            parse_bound(bad, "k")


def test_auto_weight_cap_is_the_largest_partition_in_simulation():
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=["num_clients=4", "partitioner=iid"]))
    from fedrac.data.partitioners import partition_sizes

    sizes = partition_sizes(cfg["dataset"], cfg["partitioner"], 4, cfg["seed"])
    assert build_aggregator(settings_of(cfg)).max_client_weight == max(sizes)
    deployed = build_aggregator(settings_of({**cfg, "engine": {"name": "deployment"}}))
    assert deployed.max_client_weight == "10x"


# ----------------------------------------------------------------------- exactness
LAYERS = {"rect": LayerSpec("rect", (7, 5)), "sq": LayerSpec("sq", (6, 6))}
ALPHA, SEED, NODES = 3.0, 11, 5


def _initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{n}.weight": torch.randn(*s.weight_shape, generator=gen) for n, s in LAYERS.items()}


def _factor(pid: int, key: str, shape, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * pid + sum(map(ord, key)))
    return scale * (1 + pid) * torch.randn(*shape, generator=gen)


def _reference_rule(name: str, xs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The rules as plain NumPy on ``(n, ...)`` arrays (independent of strategies/)."""
    if name == "mean":
        return np.tensordot(weights / weights.sum(), xs, axes=1)
    if name == "median":
        return np.median(xs, axis=0)
    if name == "trimmed_mean":
        k = int(np.floor(0.2 * len(xs)))
        return np.sort(xs, axis=0)[k:len(xs) - k].mean(axis=0)
    norms = np.sqrt((xs.reshape(len(xs), -1) ** 2).sum(axis=1))
    scale = np.minimum(1.0, np.median(norms) / norms)
    return np.tensordot(weights / weights.sum(), xs * scale.reshape(-1, *[1] * (xs.ndim - 1)),
                        axes=1)


def _rac_round(rule: str, rank: int) -> tuple[dict, dict, dict]:
    """One rac_lora round under ``rule`` (train_factor=B, orthogonal sketch): the server's
    merged model, the clients' factors and the sketches."""
    factors: dict[int, dict[str, torch.Tensor]] = {}

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        factors[pid] = {f"{n}.lora_B": _factor(pid, n, s.factor_shape("B", rank))
                        for n, s in LAYERS.items()}
        return reply(msg, "factors", factors[pid], 3 * (pid + 1))

    agg = Aggregator(rule, trim_fraction=0.2, max_update_norm=None, max_client_weight=None)
    strategy = STRATEGIES["rac_lora"](layers=LAYERS, rank=rank, alpha=ALPHA, sketch="orthogonal",
                                      train_factor="B", run_seed=SEED,
                                      aggregator=agg)
    seen = run_strategy(strategy, ArrayRecord(_initial()), 1, NODES, train)
    seed = derive_seed(SEED, 1)
    sketches = {n: make_sketch(seed, f"{n}.lora_A", s.factor_shape("A", rank), "orthogonal")
                for n, s in LAYERS.items()}
    return seen[-1].to_torch_state_dict(), factors, sketches


@pytest.mark.parametrize("rule", list(RULES))
def test_rac_lora_merge_is_the_rule_applied_to_the_clients_merges_in_the_shared_subspace(rule):
    """Each client's merged model W_k = W + s B_k A, read back in the subspace's coordinates
    (B_k = (W_k - W) A^T / s, A's rows orthonormal), aggregated by the rule and merged, is
    exactly the server's model."""
    rank = 2
    merged, factors, sketches = _rac_round(rule, rank)
    w0, s = _initial(), ALPHA / rank
    weights = np.array([3.0 * (p + 1) for p in range(NODES)])
    coords = {}  # per client, all layers' coordinates (the rule sees the whole update)
    for pid in range(NODES):
        client_models = {n: w0[f"{n}.weight"].double() + s * factors[pid][f"{n}.lora_B"].double()
                         @ sketches[n].double() for n in LAYERS}
        coords[pid] = np.concatenate([
            ((client_models[n] - w0[f"{n}.weight"].double()) @ sketches[n].double().T / s)
            .numpy().ravel() for n in LAYERS])
    agg = _reference_rule(rule, np.stack([coords[p] for p in range(NODES)]), weights)
    at = 0
    for n, spec in LAYERS.items():
        size = spec.d_out * rank
        b = torch.from_numpy(agg[at:at + size].reshape(spec.d_out, rank))
        at += size
        expected = w0[f"{n}.weight"].double() + s * b @ sketches[n].double()
        torch.testing.assert_close(merged[f"{n}.weight"].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["mean", "norm_clip"])
def test_with_the_orthogonal_sketch_mean_and_norm_clip_equal_the_rule_on_dense_updates(rule):
    """||B A||_F = ||B||_F for orthonormal rows of A: clipping factors is clipping the dense
    updates s B_k A, so the merge is the rule applied to the clients' dense models."""
    rank = 2
    merged, factors, sketches = _rac_round(rule, rank)
    w0, s = _initial(), ALPHA / rank
    dense = np.stack([np.concatenate([(s * factors[p][f"{n}.lora_B"].double()
                                       @ sketches[n].double()).numpy().ravel() for n in LAYERS])
                      for p in range(NODES)])
    agg = _reference_rule(rule, dense, np.array([3.0 * (p + 1) for p in range(NODES)]))
    at = 0
    for n, spec in LAYERS.items():
        size = spec.d_out * spec.d_in
        expected = w0[f"{n}.weight"].double() + torch.from_numpy(
            agg[at:at + size].reshape(spec.weight_shape))
        at += size
        torch.testing.assert_close(merged[f"{n}.weight"].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_at_rank_one_coordinate_wise_rules_equal_the_rule_on_dense_updates(rule):
    """(b_k a^T)_ij = b_ki a_j: a per-coordinate order statistic commutes with the scalar a_j."""
    merged, factors, sketches = _rac_round(rule, 1)
    w0 = _initial()
    for n in LAYERS:
        dense = np.stack([(ALPHA * factors[p][f"{n}.lora_B"].double() @ sketches[n].double())
                          .numpy() for p in range(NODES)])
        expected = w0[f"{n}.weight"].double() + torch.from_numpy(
            _reference_rule(rule, dense, np.ones(NODES)))
        torch.testing.assert_close(merged[f"{n}.weight"].double(), expected, atol=1e-5, rtol=0)


def _two_factor_round(name: str, rule: str) -> tuple[dict, dict]:
    """One round of a two-factor method (fresh adapters, B starts at zero): server model and
    the clients' local models W0 + s B_k A_k."""
    rank, local = 2, {}
    w0 = _initial()

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        seed = int(msg.content["sketch"]["seed"])
        out = {}
        for n, spec in LAYERS.items():
            a0 = make_sketch(seed, f"{n}.lora_A", spec.factor_shape("A", rank), "orthogonal")
            out[f"{n}.lora_A"] = a0 + _factor(pid, n + "A", a0.shape, 0.3)
            out[f"{n}.lora_B"] = _factor(pid, n + "B", spec.factor_shape("B", rank), 0.3)
        local[pid] = {n: w0[f"{n}.weight"].double() + ALPHA / rank * out[f"{n}.lora_B"].double()
                      @ out[f"{n}.lora_A"].double() for n in LAYERS}
        return reply(msg, "factors", out, 1)

    agg = Aggregator(rule, trim_fraction=0.2, max_update_norm=None, max_client_weight=None)
    strategy = STRATEGIES[name](layers=LAYERS, rank=rank, alpha=ALPHA, sketch="orthogonal",
                                train_factor="both", run_seed=SEED,
                                aggregator=agg)
    seen = run_strategy(strategy, ArrayRecord(w0), 1, NODES, train)
    return seen[-1].to_torch_state_dict(), local


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_fedex_lora_moves_by_the_rule_on_dense_products_and_fedit_does_not(rule):
    fedex, local = _two_factor_round("fedex_lora", rule)
    fedit, _ = _two_factor_round("fedit", rule)
    for n in LAYERS:
        expected = torch.from_numpy(_reference_rule(
            rule, np.stack([local[p][n].numpy() for p in range(NODES)]), np.ones(NODES)))
        torch.testing.assert_close(fedex[f"{n}.weight"].double(), expected, atol=1e-5, rtol=0)
        gap = float((fedit[f"{n}.weight"].double() - expected).abs().max())
        assert gap > 1e-2, (n, gap)  # FedIT: rule(B) rule(A) is not rule(B A)


def test_flora_refuses_order_statistics():
    with pytest.raises(ValueError, match="aggregation=median is not allowed for strategy flora"):
        STRATEGIES["flora"](layers=LAYERS, rank=1, alpha=1.0, run_seed=0,
                            aggregator=Aggregator("median"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["aggregation=trimmed_mean", "aggregation.trim_fraction=0.5"],
     "aggregation.trim_fraction=0.5 is not allowed; allowed: a number in [0, 0.5)"),
    (["aggregation.max_update_norm=big"],
     "aggregation.max_update_norm='big' is not allowed; allowed: null, a number > 0, auto "
     "(10x the round's median) or '<k>x' with k >= 1"),
    (["aggregation.max_client_weight=0"],
     "aggregation.max_client_weight=0 is not allowed; allowed: null, a number > 0, auto "
     "(10x the round's median) or '<k>x' with k >= 1"),
    (["strategy=flora", "aggregation=median"],
     "aggregation=median is not allowed for strategy flora (it combines each client's factors "
     "with one coefficient); allowed: mean, norm_clip"),
    (["verbose_node_errors=maybe"],
     "verbose_node_errors='maybe' is not allowed; allowed: true, false"),
])
def test_bad_aggregation_values_stop_with_one_line(overrides, message):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_composes_and_runs_with_every_averaging_strategy(rule):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        for name in STRATEGIES:
            if name == "flora" and not RULES[rule].linear:
                continue
            cfg = validate(compose("config", overrides=[f"aggregation={rule}",
                                                        f"strategy={name}"]))
            assert cfg["aggregation"]["name"] == rule


def test_fedavg_rules_act_on_updates_not_on_raw_weights():
    """W_k = G + u_k with ||u_k|| = 1, 2, 10 and ||G|| >> 10: norm_clip must clip the u_k (the
    third to norm 2), not the weights."""
    g = {"w": torch.full((2,), 100.0)}
    ups = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([6.0, 8.0])]

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        return reply(msg, "arrays", {"w": g["w"] + ups[pid]}, 1)

    agg = Aggregator("norm_clip", max_update_norm=None, max_client_weight=None)
    strategy = STRATEGIES["fedavg"](run_seed=0, aggregator=agg)
    got = run_strategy(strategy, ArrayRecord(g), 1, 3, train)[-1].to_torch_state_dict()["w"]
    expected = g["w"] + (ups[0] + ups[1] + ups[2] * 0.2) / 3
    torch.testing.assert_close(got, expected)


def test_two_factor_rules_act_on_each_factor_minus_its_start():
    """FedIT round 1: clients start from B = 0 and the seeded A_0 (norm ~ sqrt(rank) per layer);
    norm_clip must clip the updates (A_k - A_0, B_k), not the factors."""
    layers = {"sq": LayerSpec("sq", (4, 4))}
    ups = [1.0, 2.0, 10.0]  # each client's update: that times one direction (median: 2)

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        a0 = make_sketch(int(msg.content["sketch"]["seed"]), "sq.lora_A", (1, 4), "orthogonal")
        direction = torch.ones(1, 4) / 2 ** 0.5  # the same direction for every client
        return reply(msg, "factors", {"sq.lora_A": a0 + ups[pid] * direction,
                                      "sq.lora_B": ups[pid] * direction.T}, 1)

    agg = Aggregator("norm_clip", max_update_norm=None, max_client_weight=None)
    strategy = STRATEGIES["fedit"](layers=layers, rank=1, alpha=1.0, sketch="orthogonal",
                                   train_factor="both", run_seed=SEED,
                                   aggregator=agg)
    run_strategy(strategy, ArrayRecord({"sq.weight": torch.zeros(4, 4)}), 1, 3, train)
    a0 = make_sketch(derive_seed(SEED, 1, 4), "sq.lora_A", (1, 4), "orthogonal")
    mean_update = (1.0 + 2.0 + 2.0) / 3 * torch.ones(1, 4) / 2 ** 0.5  # 10 clipped to 2
    torch.testing.assert_close(strategy.adapters["sq.lora_A"], a0 + mean_update)
    torch.testing.assert_close(strategy.adapters["sq.lora_B"], mean_update.T)
