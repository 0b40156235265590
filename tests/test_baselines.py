"""The baselines' aggregation rules against the exact sum_k p_k (client k's local model).

Fake clients return random factors; each one's local model is what it received
(``arrays`` plus the ``update`` record) plus ``s * B_k @ A_k``. Exact methods must
make the server's model the weighted average of those; FedIT/COLA miss it by
exactly ``-s * sum_k p_k (B_k - B_bar)(A_k - A_bar)``.
"""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from omegaconf import OmegaConf

from clients.handlers import global_state, prepare_adapters
from fedrac.adapters import LayerSpec, adapter_factors, find_target_layers, remove_adapters
from fedrac.adapters.sketch import derive_seed
from fedrac.settings.config import ConfigError, conf_dir, validate
from strategies import STRATEGIES
from tests.helpers import reply, run_strategy

LAYERS = {"rect": LayerSpec("rect", (7, 5)), "sq": LayerSpec("sq", (6, 6))}
RANK, ALPHA, SEED, NODES = 2, 3.0, 5, 4
SCALE = ALPHA / RANK


def _initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{n}.weight": torch.randn(*s.weight_shape, generator=gen) for n, s in LAYERS.items()}


def _factor(rnd: int, pid: int, key: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * rnd + 100 * pid + sum(map(ord, key)))
    return torch.randn(*shape, generator=gen)


def _strategy(name: str, **kw):
    return STRATEGIES[name](layers=LAYERS, rank=RANK, alpha=ALPHA, sketch="gaussian",
                            run_seed=SEED, **kw)


class Clients:
    """Fake clients: random factors, weighted by ``(pid + 1) * 3`` examples; logs everything."""

    def __init__(self, sides=("A", "B")):
        self.sides, self.local, self.factors, self.messages = sides, {}, {}, []
        self.share_a = False  # every client returns the same A (then averaging is exact)

    def weight(self, pid: int) -> int:
        return (pid + 1) * 3

    def __call__(self, msg, context):
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        self.messages.append((rnd, pid, msg))
        start = global_state(msg.content)
        factors = {f"{n}.lora_{side}": _factor(rnd, 0 if self.share_a and side == "A" else pid,
                                               f"{n}{side}", s.factor_shape(side, RANK))
                   for n, s in LAYERS.items() for side in self.sides}
        local = dict(start)
        for n in LAYERS:
            a = factors.get(f"{n}.lora_A")
            b = factors.get(f"{n}.lora_B")
            if a is None or b is None:  # one-factor methods: regenerate the sketch
                model = torch.nn.Module()
                for name, spec in LAYERS.items():
                    setattr(model, name, torch.nn.Linear(spec.d_in, spec.d_out, bias=False))
                prepare_adapters(model, find_target_layers(model, list(LAYERS)),
                                 msg.content, rnd)
                both = adapter_factors(model, trained_only=False)
                remove_adapters(model)
                a = a if a is not None else both[f"{n}.lora_A"]
                b = b if b is not None else both[f"{n}.lora_B"]
            local[f"{n}.weight"] = (start[f"{n}.weight"].double()
                                    + SCALE * b.double() @ a.double())
        self.local[(rnd, pid)] = local
        self.factors[(rnd, pid)] = factors
        return reply(msg, "factors", {k: v.numpy() for k, v in factors.items()},
                     self.weight(pid))

    def exact(self, rnd: int) -> dict[str, torch.Tensor]:
        total = sum(self.weight(p) for p in range(NODES))
        return {f"{n}.weight": sum(self.weight(p) / total * self.local[(rnd, p)][f"{n}.weight"]
                                   for p in range(NODES)) for n in LAYERS}


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=0)


@pytest.mark.parametrize("zero_side", ["both", "A"])
@pytest.mark.parametrize("name", ["fedex_lora", "flora"])
def test_exact_two_factor_methods_give_the_weighted_average_of_local_models(name, zero_side):
    clients = Clients()
    seen = run_strategy(_strategy(name, train_factor=zero_side), ArrayRecord(_initial()), 3,
                        NODES, clients)
    for rnd in (1, 2, 3):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd)
        for key in exact:
            assert _close(got[key], exact[key]), (name, rnd, key)


@pytest.mark.parametrize(("name", "side"), [
    ("ffa_lora", "A"), ("ffa_lora", "B"), ("rac_lora", "A"), ("rac_lora", "B"),
    ("rac_lora", "alternate")])
def test_one_factor_methods_give_the_weighted_average_of_local_models(name, side):
    clients = Clients(sides=None)

    def train(msg, context):
        clients.sides = (msg.content["config"]["train-factor"],)
        return clients(msg, context)

    seen = run_strategy(_strategy(name, train_factor=side), ArrayRecord(_initial()), 3, NODES,
                        train)
    for rnd in (1, 2, 3):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd)
        for key in exact:
            assert _close(got[key], exact[key]), (name, rnd, key)


@pytest.mark.parametrize("name", ["fedit", "cola"])
def test_separate_averaging_misses_exactly_the_factor_covariance(name):
    clients = Clients()
    strategy = _strategy(name, train_factor="B", **({"merge_every": 2} if name == "cola" else {}))
    seen = run_strategy(strategy, ArrayRecord(_initial()), 2, NODES, clients)
    total = sum(clients.weight(p) for p in range(NODES))
    p = [clients.weight(k) / total for k in range(NODES)]
    for rnd in (1, 2):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd)
        for n in LAYERS:
            fa = [clients.factors[(rnd, k)][f"{n}.lora_A"].double() for k in range(NODES)]
            fb = [clients.factors[(rnd, k)][f"{n}.lora_B"].double() for k in range(NODES)]
            a_bar = sum(w * a for w, a in zip(p, fa, strict=True))
            b_bar = sum(w * b for w, b in zip(p, fb, strict=True))
            covariance = sum(w * (b - b_bar) @ (a - a_bar)
                             for w, a, b in zip(p, fa, fb, strict=True))
            gap = got[f"{n}.weight"].double() - exact[f"{n}.weight"]
            assert _close(gap, -SCALE * covariance), (name, rnd, n)
            assert gap.norm() > 0.1 * exact[f"{n}.weight"].norm()
            bound = SCALE * sum(w * (b - b_bar).norm() * (a - a_bar).norm()
                                for w, a, b in zip(p, fa, fb, strict=True))
            assert gap.norm() <= bound + 1e-6


def test_separate_averaging_is_exact_when_clients_share_a():
    clients = Clients()
    clients.share_a = True
    seen = run_strategy(_strategy("fedit"), ArrayRecord(_initial()), 1, NODES, clients)
    got, exact = seen[1].to_torch_state_dict(), clients.exact(1)
    for key in exact:
        assert _close(got[key], exact[key])


def test_fedit_adapters_persist_and_cola_restarts_after_a_merge():
    fedit, cola = Clients(), Clients()
    run_strategy(_strategy("fedit"), ArrayRecord(_initial()), 3, NODES, fedit)
    run_strategy(_strategy("cola", merge_every=2), ArrayRecord(_initial()), 3, NODES, cola)
    total = sum(fedit.weight(p) for p in range(NODES))
    for clients, restart_rounds in ((fedit, {1}), (cola, {1, 3})):
        for rnd, _pid, msg in clients.messages:
            content = msg.content
            assert ("sketch" in content) == (rnd in restart_rounds)
            assert ("adapters" in content) == (rnd not in restart_rounds)
            if rnd not in restart_rounds:
                sent = content["adapters"].to_torch_state_dict()
                for key, value in sent.items():
                    avg = sum(clients.weight(p) / total * clients.factors[(rnd - 1, p)][key]
                              for p in range(NODES))
                    assert _close(value, avg, 1e-5)
    base = [m.content["arrays"].to_torch_state_dict()["sq.weight"] for r, _, m in fedit.messages]
    assert all(torch.equal(b, _initial()["sq.weight"]) for b in base)  # FedIT: W0 frozen
    merged = [m.content["arrays"].to_torch_state_dict()["sq.weight"]
              for r, _, m in cola.messages if r == 3][0]
    assert not torch.equal(merged, _initial()["sq.weight"])  # COLA: the link was merged


def test_fresh_adapters_follow_the_orientation():
    msgs = Clients()
    run_strategy(_strategy("flora", train_factor="A"), ArrayRecord(_initial()), 1, 1, msgs)
    content = msgs.messages[0][2].content
    assert content["config"]["zero-factor"] == "A"
    model = torch.nn.Module()
    for name, spec in LAYERS.items():
        setattr(model, name, torch.nn.Linear(spec.d_in, spec.d_out, bias=False))
    prepare_adapters(model, find_target_layers(model, list(LAYERS)), content, 1)
    factors = adapter_factors(model, trained_only=True)
    remove_adapters(model)
    assert set(factors) == {f"{n}.lora_{s}" for n in LAYERS for s in "AB"}
    assert all(float(factors[f"{n}.lora_A"].abs().sum()) == 0 for n in LAYERS)
    assert all(float(factors[f"{n}.lora_B"].abs().sum()) > 0 for n in LAYERS)


def _ledger(name: str, nodes: int, rounds: int = 2, **kw):
    clients = Clients(sides=None)

    def train(msg, context):
        side = msg.content["config"]["train-factor"]
        clients.sides = ("A", "B") if side == "both" else (side,)
        return clients(msg, context)

    strategy = _strategy(name, **kw)
    run_strategy(strategy, ArrayRecord(_initial()), rounds, nodes, train)
    return strategy.ledger


def _nbytes(shapes) -> int:
    """Serialized bytes of float32 arrays of these shapes (what the ledger measures)."""
    return sum(len(Array(np.zeros(shape, np.float32)).data) for shape in shapes)


def test_byte_ledger_shows_what_each_method_sends():
    dense = _nbytes(s.weight_shape for s in LAYERS.values())
    factors = _nbytes(s.factor_shape(side, RANK) for s in LAYERS.values() for side in "AB")
    for name in ("rac_lora", "ffa_lora"):
        ledger = _ledger(name, NODES, train_factor="B")
        for rnd in (1, 2):
            assert set(ledger.round_kinds(rnd, "down")) == {"weights", "seeds", "config"}
            assert ledger.round_kinds(rnd, "up")["factors"] == NODES * _nbytes(
                s.factor_shape("B", RANK) for s in LAYERS.values())
    fedex = _ledger("fedex_lora", NODES)
    assert "residual" not in fedex.round_kinds(1, "down")
    assert fedex.round_kinds(2, "down")["residual"] == NODES * dense
    assert fedex.round_kinds(2, "down")["factors"] == NODES * factors
    fedit = _ledger("fedit", NODES)
    assert "residual" not in fedit.round_kinds(2, "down")
    assert fedit.round_kinds(2, "down")["factors"] == NODES * factors
    assert fedit.round_kinds(2, "up")["factors"] == NODES * factors
    for k in (2, 4):  # FLoRA's download: k clients x the k stacked factor pairs
        stacked = _nbytes(s.factor_shape(side, k * RANK) for s in LAYERS.values() for side in "AB")
        assert _ledger("flora", k).round_kinds(2, "down")["factors"] == k * stacked


def test_ffa_keeps_one_sketch_and_rac_alternates_sides():
    ffa, rac = Clients(sides=None), Clients(sides=None)

    def wrap(clients):
        def train(msg, context):
            clients.sides = (msg.content["config"]["train-factor"],)
            return clients(msg, context)
        return train

    run_strategy(_strategy("ffa_lora", train_factor="B"), ArrayRecord(_initial()), 3, 2,
                 wrap(ffa))
    run_strategy(_strategy("rac_lora", train_factor="alternate"), ArrayRecord(_initial()), 4, 2,
                 wrap(rac))
    assert {m.content["sketch"]["seed"] for _, _, m in ffa.messages} == {derive_seed(SEED, 0)}
    sides = {r: m.content["config"]["train-factor"] for r, _, m in rac.messages}
    assert sides == {1: "B", 2: "A", 3: "B", 4: "A"}
    coin = _strategy("rac_lora", train_factor="bernoulli")
    drawn = [coin.round_side(r) for r in range(1, 41)]
    assert drawn == [coin.round_side(r) for r in range(1, 41)] and set(drawn) == {"A", "B"}


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy=cola", "strategy.merge_every=0"],
     "strategy.merge_every=0 is not allowed; allowed: an integer >= 1"),
    (["strategy=fedit", "strategy.train_factor=alternate"],
     "strategy.train_factor='alternate' is not allowed; allowed: both, A, B"),
    (["strategy=ffa_lora", "strategy.train_factor=both"],
     "strategy.train_factor='both' is not allowed; allowed: A, B, auto"),
])
def test_bad_strategy_values_stop_with_one_line(overrides, message):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=overrides + ["engine=inline"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == message
    assert OmegaConf.select(cfg, "strategy.name") == overrides[0].split("=")[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedex_lora", "flora"])  # the two with an `update` record
def test_each_baseline_fine_tunes_the_digits_model_end_to_end(name, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from fedrac.run import run_experiment

    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=[
            f"strategy={name}", "engine=inline", "num_rounds=3", "num_clients=3",
            "partitioner=iid", "pretrain.epochs=5", f"output_dir={tmp_path / 'run'}"]))
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    try:
        summary = run_experiment(cfg)
    finally:
        flwr_logger.setLevel(level)  # run_experiment quiets Flower's logger for the process
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.05
    down = summary["bytes_by_kind"]["down"]
    assert ("residual" in down) == (name == "fedex_lora")
    assert "factors" in down
