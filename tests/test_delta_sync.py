"""``strategy.download=delta``: clients rebuild the global weights from seeds and factors.

Runs fedrac's real ClientApp (digits, MLP, LoRA adapters) under the inline engine with
partial participation, against the same run with full downloads.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from hydra import compose, initialize_config_dir

from clients.client_app import make_client_app
from fedrac.adapters import find_target_layers
from fedrac.data import load_splits
from fedrac.engines.inline import run_inline
from fedrac.models import build_model
from fedrac.models.pretrain import pretrained_state
from fedrac.settings.config import ConfigError, conf_dir, validate
from fedrac.settings.typed import settings_of
from fedrac.wire.delta_sync import (
    STATE_CONFIG,
    STATE_SYNC,
    STATE_WEIGHTS,
    ResyncNeeded,
    apply_deltas,
    weights_checksum,
)
from strategies import build_strategy
from strategies.delta_sync import DeltaSync

ROUNDS, CLIENTS = 6, 6


def _cfg(cache, tmp, *overrides: str) -> dict:
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=[
            f"num_clients={CLIENTS}", f"num_rounds={ROUNDS}", "client.local_steps=2",
            f"cache_dir={cache}", f"output_dir={tmp}", "pretrain.epochs=2", *overrides])
    return validate(cfg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(cfg: dict, tamper=None):
    """Run the strategy; return the global weights per round, the grid and the strategy."""
    task = load_splits(cfg["dataset"])
    model = build_model(cfg["model"], task.input_shape, task.num_classes)
    state = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], cfg["cache_dir"])
    strategy = build_strategy(settings_of(cfg),
                              find_target_layers(model, cfg["model"]["target_modules"]))
    seen: list[dict[str, torch.Tensor]] = []
    holder: dict[str, Grid] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        holder["grid"] = grid

        def evaluate_fn(rnd: int, arrays: ArrayRecord) -> None:
            seen.append(arrays.to_torch_state_dict())
            if tamper is not None:
                tamper(rnd, grid)

        strategy.start(grid, ArrayRecord(state), num_rounds=ROUNDS, evaluate_fn=evaluate_fn)

    grid = run_inline(server, make_client_app(settings_of(cfg)), CLIENTS)
    return seen, grid, strategy


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == ROUNDS + 1
    for sa, sb in zip(a, b, strict=True):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _down(strategy, kind: str) -> int:
    return strategy.ledger.totals()["down"].get(kind, 0)


@pytest.mark.parametrize("side", ["auto", "alternate"])
def test_partial_participation_rebuilds_bit_identical_weights(cache, tmp_path, side):
    """With ``alternate`` the trained side changes per round: the slim config must say so."""
    full, _, s_full = _run(_cfg(cache, tmp_path, "fraction_train=0.5",
                                f"strategy.train_factor={side}"))
    delta, grid, s_delta = _run(_cfg(cache, tmp_path, "fraction_train=0.5",
                                     f"strategy.train_factor={side}", "strategy.download=delta"))
    _assert_same(full, delta)  # same trajectory, bit for bit
    versions = set()
    for node in grid.get_node_ids():
        ctx = grid.node_context(node)
        if ctx is None:
            continue
        version = int(ctx.state[STATE_SYNC]["version"])
        versions.add(version)
        cached = ctx.state[STATE_WEIGHTS].to_torch_state_dict()
        assert all(torch.equal(cached[k], delta[version][k]) for k in cached)  # exactly W_v
    assert len(versions) > 1  # nodes were at different versions: deltas spanned rounds
    assert _down(s_delta, "deltas") > 0
    assert _down(s_delta, "weights") < _down(s_full, "weights") / 2  # only first contacts
    assert sum(s_delta.ledger.round_total(r, "down") for r in range(1, ROUNDS + 1)) < \
        sum(s_full.ledger.round_total(r, "down") for r in range(1, ROUNDS + 1)) / 2


@pytest.mark.parametrize("damage", ["corrupt", "delete", "lr", "local-epochs"])
def test_damaged_cache_triggers_a_full_resync(cache, tmp_path, damage):
    """Altered or missing cached weights, or a cached train config with another ``lr`` or
    ``local-epochs`` (which the checksum of the round's config covers)."""
    resynced: list[int] = []

    def tamper(rnd: int, grid) -> None:
        if rnd != 2:
            return
        for node in grid.get_node_ids():
            ctx = grid.node_context(node)
            if ctx is None:
                continue
            if damage == "delete":
                del ctx.state[STATE_WEIGHTS]
            elif damage in ("lr", "local-epochs"):
                config = dict(ctx.state[STATE_CONFIG])
                config[damage] = config[damage] * 2
                ctx.state[STATE_CONFIG] = ConfigRecord(config)
            else:
                weights = ctx.state[STATE_WEIGHTS].to_torch_state_dict()
                weights["fc1.weight"] = weights["fc1.weight"] + 1e-6
                ctx.state[STATE_WEIGHTS] = ArrayRecord(weights)
            resynced.append(node)

    full, _, _ = _run(_cfg(cache, tmp_path))
    delta, _, strategy = _run(_cfg(cache, tmp_path, "strategy.download=delta"), tamper)
    _assert_same(full, delta)  # every damaged node resynced and trained in the same round
    assert len(resynced) == CLIENTS
    per_round = [strategy.ledger.round_kinds(r, "down").get("weights", 0)
                 for r in range(1, ROUNDS + 1)]
    assert per_round[0] > 0 and per_round[2] == per_round[0]  # round 3: all full again
    assert per_round[1] == 0 and all(b == 0 for b in per_round[3:])


def test_full_participation_downloads_cost_about_the_upload(cache, tmp_path):
    _, _, strategy = _run(_cfg(cache, tmp_path, "strategy.download=delta"))
    for rnd in range(2, ROUNDS + 1):
        down, up = strategy.ledger.round_total(rnd, "down"), strategy.ledger.round_total(rnd, "up")
        # 1.15: the seed records' size depends on the seeds' values (a few bytes per round)
        assert down <= 1.15 * up, (rnd, down, up)


def test_apply_deltas_refuses_incomplete_deltas():
    model = build_model({"name": "mlp", "hidden": [8]}, (4,), 3)
    layers = find_target_layers(model, ["all"])
    state = model.state_dict()
    good = {"1/fc1.lora_B": torch.ones(8, 1), "1/head.lora_A": torch.ones(1, 8)}
    out = apply_deltas(state, layers, good, [1], [7], 1, 1.0, "orthogonal")
    assert weights_checksum(out) != weights_checksum(state)
    for bad, rounds, seeds in (({"1/fc1.lora_B": torch.ones(8, 1)}, [1], [7]),
                               (good, [1], []), ({**good, "2/fc1.lora_B": good["1/fc1.lora_B"]},
                                                 [1], [7])):
        with pytest.raises(ResyncNeeded):
            apply_deltas(state, layers, bad, rounds, seeds, 1, 1.0, "orthogonal")


def test_a_node_too_far_behind_gets_full_weights():
    sync = DeltaSync()
    arrays = ArrayRecord({"w": torch.zeros(4, 4)})  # 64 bytes of weights (plus a header)

    def common(rnd: int) -> dict:
        return {"config": ConfigRecord({"server-round": rnd, "lr": 0.1})}

    assert "arrays" in sync.downloads(1, arrays, [5], common(1))[5]  # first contact
    sync.record(1, 11, {"w.lora_B": torch.zeros(4, 1)})
    nearby = sync.downloads(2, arrays, [5], common(2))[5]  # one round behind
    assert "deltas" in nearby and "arrays" not in nearby
    assert dict(nearby["config"]) == {"server-round": 2}  # the rest is cached on the node
    for rnd in range(2, 40):
        sync.record(rnd, rnd, {"w.lora_B": torch.zeros(4, 1)})
    later = sync.downloads(40, arrays, [5], common(40))[5]
    assert "arrays" in later and "deltas" not in later  # 38 rounds behind: weights are smaller
    assert sync.complete_since > 2  # and the old rounds were dropped


def test_download_is_validated(cache, tmp_path):
    with pytest.raises(ConfigError, match="strategy.download='sometimes'"):
        _cfg(cache, tmp_path, "strategy.download=sometimes")
    with pytest.raises(ConfigError, match="strategy.download='delta'"):
        _cfg(cache, tmp_path, "strategy=fedavg", "strategy.download=delta")
