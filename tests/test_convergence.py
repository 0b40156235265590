"""Fed-RAC-LoRA reaches the full fine-tuning optimum; a fixed sketch (asymmetric LoRA) stalls.

Least squares with a unique minimiser W* (realizable: every client's data come from
the same W*, so several local steps cause no client drift). Clients use fedrac's
real adapter path (regenerate the sketch, check its fingerprint, zero-init, train).
"""

from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.handlers import prepare_adapters
from fedrac.adapters import adapter_factors, find_target_layers, remove_adapters
from strategies.rac_lora import RacLoRA
from tests.helpers import reply, run_strategy

D_OUT, D_IN, CLIENTS, N, LOCAL_STEPS = 6, 8, 4, 40, 5
ROUNDS = 250


def _problem():
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    xs = [torch.randn(N, D_IN, generator=gen, dtype=torch.float64) for _ in range(CLIENTS)]
    ys = [x @ w_star.T for x in xs]
    lip = max(float(torch.linalg.eigvalsh(x.T @ x / N).max()) for x in xs)
    return w_star, xs, ys, lip


W_STAR, XS, YS, LIP = _problem()


def _model() -> nn.Module:
    return nn.Sequential(OrderedDict(lin=nn.Linear(D_IN, D_OUT, bias=False))).double()


def _client_train(msg, context):
    """Plain gradient steps (step 1/L) on the trained factor of fedrac's adapters."""
    pid = int(context.node_config["partition-id"])
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    prepare_adapters(model, find_target_layers(model, ["lin"]), msg.content,
                     int(msg.content["config"]["server-round"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0 / LIP)
    for _ in range(LOCAL_STEPS):
        opt.zero_grad()
        loss = 0.5 * ((model(XS[pid]) - YS[pid]) ** 2).sum(dim=1).mean()
        loss.backward()
        opt.step()
    factors = adapter_factors(model)
    remove_adapters(model)
    return reply(msg, "factors", factors, N)


def _distance(train_factor: str, resample_every: int) -> float:
    layers = find_target_layers(_model(), ["lin"])
    strategy = RacLoRA(layers=layers, rank=1, alpha=1.0, sketch="orthogonal",
                       train_factor=train_factor, resample_every=resample_every, run_seed=3)
    initial = ArrayRecord({"lin.weight": torch.zeros(D_OUT, D_IN, dtype=torch.float64)})
    seen = run_strategy(strategy, initial, ROUNDS, CLIENTS, _client_train)
    w = seen[-1].to_torch_state_dict()["lin.weight"]
    return float(torch.linalg.norm(w - W_STAR) / torch.linalg.norm(W_STAR))


def test_the_problem_has_the_stated_unique_optimum():
    x, y = torch.cat(XS), torch.cat(YS)
    fpft = torch.linalg.lstsq(x, y).solution.T
    assert torch.allclose(fpft, W_STAR, atol=1e-10)


@pytest.mark.parametrize("side", ["B", "A"])
def test_rac_lora_converges_to_the_fpft_optimum(side):
    assert _distance(side, resample_every=1) < 1e-3


def test_a_fixed_sketch_stays_far_from_the_optimum():
    assert _distance("B", resample_every=10**9) > 0.3
