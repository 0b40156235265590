"""``strategy=fed_sb`` with ``download=delta``: a node holding the weights gets the rounds'
averaged ``R`` (r x r per layer) and trained modules, and rebuilds the server's weights bit
for bit (fedrac's real ClientApp on digits, under the inline engine)."""

from __future__ import annotations

import pytest
import torch

from clients.fed_sb import STATE_FRAME
from fedrac.wire.delta_sync import STATE_SYNC, STATE_WEIGHTS, ResyncNeeded, apply_change
from tests.test_delta_sync import CLIENTS, ROUNDS, _assert_same, _cfg, _run

FED_SB = ("strategy=fed_sb", "strategy.rank=4")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_partial_participation_rebuilds_the_servers_weights_bit_for_bit(cache, tmp_path):
    full, _, s_full = _run(_cfg(cache, tmp_path, *FED_SB, "fraction_train=0.5"))
    delta, grid, s_delta = _run(_cfg(cache, tmp_path, *FED_SB, "fraction_train=0.5",
                                     "strategy.download=delta"))
    _assert_same(full, delta)  # the same run, bit for bit
    versions = set()
    for node in grid.get_node_ids():
        ctx = grid.node_context(node)
        if ctx is None or STATE_SYNC not in ctx.state:
            continue
        version = int(ctx.state[STATE_SYNC]["version"])
        versions.add(version)
        cached = ctx.state[STATE_WEIGHTS].to_torch_state_dict()
        assert cached.keys() == delta[version].keys()
        assert all(torch.equal(cached[k], delta[version][k]) for k in cached)  # exactly W_v
    assert len(versions) > 1  # nodes at different versions: some deltas spanned rounds
    down = s_delta.ledger.totals()["down"]
    assert down.get("deltas", 0) > 0
    assert down["weights"] < s_full.ledger.totals()["down"]["weights"] / 2  # first contacts


def test_after_the_first_round_the_download_is_about_the_upload(cache, tmp_path):
    _, _, strategy = _run(_cfg(cache, tmp_path, *FED_SB, "strategy.download=delta"))
    for rnd in range(2, ROUNDS + 1):
        kinds = strategy.ledger.round_kinds(rnd, "down")
        down, up = strategy.ledger.round_total(rnd, "down"), strategy.ledger.round_total(rnd, "up")
        assert "weights" not in kinds and "factors" not in kinds, (rnd, kinds)
        assert down <= 3 * up, (rnd, down, up)


def test_a_node_that_lost_its_state_resyncs_and_gets_b_a_again(cache, tmp_path):
    """A restarted node (no cached weights, no ``B``, ``A``) gets the full weights and the
    fixed factors in the same round: the run does not change."""
    lost: list[int] = []

    def tamper(rnd: int, grid) -> None:
        if rnd != 2:
            return
        for node in grid.get_node_ids():
            ctx = grid.node_context(node)
            if ctx is not None and STATE_WEIGHTS in ctx.state:
                del ctx.state[STATE_WEIGHTS]
                del ctx.state[STATE_FRAME]
                lost.append(node)

    full, _, _ = _run(_cfg(cache, tmp_path, *FED_SB))
    delta, _, strategy = _run(_cfg(cache, tmp_path, *FED_SB, "strategy.download=delta"), tamper)
    _assert_same(full, delta)
    assert lost
    per_round = [strategy.ledger.round_kinds(r, "down") for r in range(1, ROUNDS + 1)]
    # round 3: the weights to every node again (round 1: also to the init client)
    assert per_round[2]["weights"] * (CLIENTS + 1) == per_round[0]["weights"] * CLIENTS > 0
    assert per_round[2]["factors"] == per_round[0]["factors"] > 0  # with B, A
    assert "weights" not in per_round[1] and "weights" not in per_round[3]


def test_middle_factors_need_the_frame():
    from fedrac.adapters import LayerSpec

    layers = {"x": LayerSpec("x", (3, 2))}
    state = {"x.weight": torch.zeros(3, 2)}
    change = {"x.lora_R": torch.eye(1)}
    frame = {"x.lora_B": torch.ones(3, 1), "x.lora_A": torch.full((1, 2), 2.0)}
    out = apply_change(state, layers, change, 0, 1, 0.5, None, frame)
    assert torch.equal(out["x.weight"], torch.ones(3, 2))  # 0.5 * B R A
    with pytest.raises(ResyncNeeded, match="holds no B, A"):
        apply_change(state, layers, change, 0, 1, 0.5, None, None)
    with pytest.raises(ResyncNeeded, match="one middle factor R per layer"):
        apply_change(state, {**layers, "y": LayerSpec("y", (2, 2))}, change, 0, 1, 0.5, None,
                     frame)


def test_the_fixed_factors_are_hashed_once_a_run_not_once_a_round(cache, tmp_path,
                                                                    monkeypatch):
    """The server fingerprints ``B``, ``A`` once (not per round); a node keeps the
    fingerprint beside them and hashes only what it is sent (once per node), not its own
    copy each round."""
    import clients.fed_sb as client_side
    import strategies.fed_sb as server_side

    calls = {"server": 0, "node": 0}
    real = server_side.fingerprint

    def counted(side):
        def fp(frame):
            calls[side] += 1
            return real(frame)
        return fp

    monkeypatch.setattr(server_side, "fingerprint", counted("server"))
    monkeypatch.setattr(client_side, "fingerprint", counted("node"))
    _, grid, _ = _run(_cfg(cache, tmp_path, *FED_SB, "strategy.download=delta"))
    holders = sum(STATE_FRAME in grid.node_context(n).state for n in grid.get_node_ids()
                  if grid.node_context(n) is not None)
    assert ROUNDS > 2 and calls["server"] == 1
    assert 0 < holders and calls["node"] <= 2 * holders  # with_frame + held_frame, on receipt
