"""The paper's options (client weighting, bernoulli sides) and checks a wrong method fails:
fingerprint refusal, partial participation, mixed trained sides, resampling every k rounds."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.handlers import prepare_adapters
from fedrac.adapters import find_target_layers, remove_adapters
from fedrac.adapters.sketch import SketchMismatchError, fingerprint, make_sketch
from tests.helpers import reply, run_strategy
from tests.test_baselines import LAYERS, NODES, Clients, _close, _initial, _strategy


class Uniform(Clients):
    """Fake clients whose exact average is the plain 1/M mean of their local models."""

    def __init__(self, sides=("A", "B"), nodes=NODES):
        super().__init__(sides)
        self.nodes = nodes
        self.pids: dict[int, list[int]] = {}

    def __call__(self, msg, context):
        rnd = int(msg.content["config"]["server-round"])
        self.pids.setdefault(rnd, []).append(int(context.node_config["partition-id"]))
        return super().__call__(msg, context)

    def exact(self, rnd: int, uniform: bool = True) -> dict[str, torch.Tensor]:
        pids = self.pids[rnd]
        w = {p: 1.0 if uniform else float(self.weight(p)) for p in pids}
        total = sum(w.values())
        return {f"{n}.weight": sum(w[p] / total * self.local[(rnd, p)][f"{n}.weight"]
                                   for p in pids) for n in LAYERS}


def _one_factor(clients):
    def train(msg, context):
        clients.sides = (msg.content["config"]["train-factor"],)
        return clients(msg, context)
    return train


@pytest.mark.parametrize("name", ["rac_lora", "fedex_lora", "flora"])
def test_uniform_client_weighting_gives_the_plain_mean(name):
    clients = Uniform(sides=None if name == "rac_lora" else ("A", "B"))
    train = _one_factor(clients) if name == "rac_lora" else clients
    kw = {"train_factor": "B"} if name == "rac_lora" else {}
    seen = run_strategy(_strategy(name, client_weighting="uniform", **kw),
                        ArrayRecord(_initial()), 2, NODES, train)
    for rnd in (1, 2):
        got = seen[rnd].to_torch_state_dict()
        plain, weighted = clients.exact(rnd), clients.exact(rnd, uniform=False)
        for key in plain:
            assert _close(got[key], plain[key]), (name, rnd, key)
            assert not _close(got[key], weighted[key], 1e-2)


def test_an_unknown_client_weighting_is_refused():
    with pytest.raises(ValueError, match=r"strategy.client_weighting='median' is not allowed; "
                                         r"allowed: examples, uniform"):
        _strategy("fedit", client_weighting="median")


@pytest.mark.parametrize("name", ["fedit", "fedex_lora", "flora", "cola"])
def test_partial_participation_of_the_two_factor_methods(name):
    """Half of the nodes per round: the exact methods average exactly the sampled clients'
    local models; FedIT/COLA average exactly the sampled clients' factors."""
    clients = Uniform()
    seen = run_strategy(_strategy(name, fraction_train=0.5), ArrayRecord(_initial()), 3, NODES,
                        clients)
    assert all(len(p) == NODES // 2 for p in clients.pids.values())
    assert len({tuple(sorted(p)) for p in clients.pids.values()}) > 1  # the sample changes
    for rnd in (1, 2, 3):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd, uniform=False)
        if name in ("fedex_lora", "flora"):
            for key in exact:
                assert _close(got[key], exact[key]), (name, rnd, key)
        else:
            pids = clients.pids[rnd]
            total = sum(clients.weight(p) for p in pids)
            for n in LAYERS:
                a = sum(clients.weight(p) / total * clients.factors[(rnd, p)][f"{n}.lora_A"]
                        for p in pids)
                b = sum(clients.weight(p) / total * clients.factors[(rnd, p)][f"{n}.lora_B"]
                        for p in pids)
                delta = got[f"{n}.weight"].double() - _initial()[f"{n}.weight"].double()
                if name == "cola" and rnd > 1:  # COLA merged the earlier links into W
                    prev = seen[rnd - 1].to_torch_state_dict()[f"{n}.weight"].double()
                    delta = got[f"{n}.weight"].double() - prev
                assert _close(delta, 1.5 * b.double() @ a.double()), (name, rnd, n)


def test_bernoulli_sides_and_resampling_every_k_rounds_merge_exactly():
    clients = Uniform(sides=None)
    strategy = _strategy("rac_lora", train_factor="bernoulli", resample_every=2)
    seen = run_strategy(strategy, ArrayRecord(_initial()), 4, NODES, _one_factor(clients))
    sides = {rnd: msg.content["config"]["train-factor"] for rnd, _, msg in clients.messages}
    seeds = {rnd: msg.content["sketch"]["seed"] for rnd, _, msg in clients.messages}
    assert set(sides.values()) <= {"A", "B"}
    assert seeds[1] == seeds[2] != seeds[3] == seeds[4]
    for rnd in (1, 2, 3, 4):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd, uniform=False)
        for key in exact:
            assert _close(got[key], exact[key]), (rnd, key)


def test_mixed_trained_sides_within_one_model_merge_exactly():
    """``auto`` trains A in the layer with d_in < d_out and B in the square one."""
    clients = Uniform(sides=("A", "B"))
    strategy = _strategy("rac_lora", train_factor="auto")
    plan_sides = {n: ("A" if s.d_in < s.d_out else "B") for n, s in LAYERS.items()}
    assert set(plan_sides.values()) == {"A", "B"}

    def one_side(msg, context):
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        clients(msg, context)  # draws both factors; keep the trained one per layer
        keep = {f"{n}.lora_{plan_sides[n]}" for n in LAYERS}
        factors = {k: v for k, v in clients.factors[(rnd, pid)].items() if k in keep}
        clients.factors[(rnd, pid)] = factors
        # rebuild the local model from the trained factor and the regenerated sketch
        local = dict(clients.local[(rnd, pid)])
        for n, spec in LAYERS.items():
            side = plan_sides[n]
            other = "B" if side == "A" else "A"
            sk = make_sketch(int(msg.content["sketch"]["seed"]), f"{n}.lora_{other}",
                             spec.factor_shape(other, 2), "gaussian").double()
            f = factors[f"{n}.lora_{side}"].double()
            a, b = (f, sk) if side == "A" else (sk, f)
            start = msg.content["arrays"].to_torch_state_dict()[f"{n}.weight"].double()
            local[f"{n}.weight"] = start + 1.5 * b @ a
        clients.local[(rnd, pid)] = local
        return reply(msg, "factors", {k: v.numpy() for k, v in factors.items()},
                          clients.weight(pid))

    seen = run_strategy(strategy, ArrayRecord(_initial()), 2, NODES, one_side)
    for rnd in (1, 2):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd, uniform=False)
        for key in exact:
            assert _close(got[key], exact[key]), (rnd, key)


def test_the_client_refuses_a_sketch_whose_fingerprint_differs():
    """prepare_adapters (the real client path) checks the server's fingerprint."""
    model = torch.nn.Module()
    for name, spec in LAYERS.items():
        setattr(model, name, torch.nn.Linear(spec.d_in, spec.d_out, bias=False))
    layers = find_target_layers(model, list(LAYERS))
    sketches = {f"{n}.lora_A": make_sketch(11, f"{n}.lora_A", s.factor_shape("A", 2), "gaussian")
                for n, s in LAYERS.items()}

    def content(fp):
        return RecordDict({
            "sketch": ConfigRecord({"seed": 11, "distribution": "gaussian", "fingerprint": fp}),
            "config": ConfigRecord({"rank": 2, "alpha": 3.0, "train-factor": "B"})})

    prepare_adapters(model, layers, content(fingerprint(sketches)), 1)  # the right one
    remove_adapters(model)
    wrong = fingerprint({k: v * 1.0001 for k, v in sketches.items()})
    with pytest.raises(SketchMismatchError, match="round 4: regenerated sketch fingerprint"):
        prepare_adapters(model, layers, content(wrong), 4)


def test_bernoulli_train_factor_p_sets_the_share_of_b_rounds():
    sides = {p: [_strategy("rac_lora", train_factor="bernoulli", train_factor_p=p).round_side(t)
                 for t in range(1, 401)] for p in (0.0, 0.2, 1.0)}
    assert set(sides[0.0]) == {"A"} and set(sides[1.0]) == {"B"}
    assert 0.15 < sides[0.2].count("B") / 400 < 0.25
    with pytest.raises(ValueError, match=r"strategy.train_factor_p=1.5 is not allowed; "
                                         r"allowed: a number in \[0, 1\]"):
        _strategy("rac_lora", train_factor="bernoulli", train_factor_p=1.5)
