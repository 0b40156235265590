"""The real client (handle_train: data, adapters, sketch, local training) through the server
merge: the exact methods' global model is the weighted average of the locally trained ones."""

import pytest
import torch
from flwr.app import ArrayRecord

import clients.handlers as handlers
from clients.client_app import make_client_app
from fedrac.adapters import effective_weights, find_target_layers
from fedrac.settings.typed import settings_of
from strategies import build_strategy
from tests.helpers import run_config, run_strategy

NODES = 3


@pytest.mark.parametrize("name,extra", [
    ("rac_lora", ["strategy.sketch=gaussian", "strategy.train_factor=auto"]),
    ("rac_lora", ["strategy.sketch=rademacher", "strategy.train_factor=A",
                  "client.projected_step=true"]),
    ("fedex_lora", ["client.refactor=reflora"]),
    ("flora", ["client.refactor=reflora_s"]),
])
def test_real_clients_merge_into_the_weighted_average_of_their_local_models(
        tmp_path, monkeypatch, name, extra):
    cfg = run_config(tmp_path, f"strategy={name}", f"num_clients={NODES}", "num_rounds=2",
                     "client.local_steps=4", "client.lr=0.01", "strategy.rank=2",
                     "strategy.alpha=3", *extra)
    model = handlers.client_model(settings_of(cfg))
    layers = find_target_layers(model, cfg["model"]["target_modules"])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(settings_of(cfg), layers)  # the settings the clients get too
    local: list[tuple[int, dict[str, torch.Tensor]]] = []
    real = handlers.train_locally

    def recording(model_, x, y, settings, seed, device, task=None):
        result = real(model_, x, y, settings, seed, device, task)
        adapted = effective_weights(model_)  # the weights the adapted layers compute with
        local.append((result.num_examples, {spec.weight_key: adapted[spec.weight_key]
                                            .to(torch.float64) for spec in layers.values()}))
        return result

    monkeypatch.setattr(handlers, "train_locally", recording)
    seen = run_strategy(strategy, ArrayRecord(initial), 2, NODES, make_client_app(settings_of(cfg)))
    assert len(local) == 2 * NODES
    for rnd in (1, 2):
        round_local = local[(rnd - 1) * NODES: rnd * NODES]
        total = sum(n for n, _ in round_local)
        got = seen[rnd].to_torch_state_dict()
        before = seen[rnd - 1].to_torch_state_dict()
        for key in round_local[0][1]:
            exact = sum(n / total * w[key] for n, w in round_local)
            moved = (exact - before[key].double()).abs().max()
            assert moved > 1e-4, (name, rnd, key)  # the clients really trained
            assert torch.allclose(got[key].double(), exact, atol=2e-6, rtol=0), (
                name, rnd, key, (got[key].double() - exact).abs().max())
