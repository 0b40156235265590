"""A wrecked run fails (exit 3, status failed) instead of reporting ok; the default ``mean``
drops an update 10x over the round's median norm."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedrac.server import divergence
from fedrac.server.divergence import DivergenceGuard, RunDiverged
from tests.helpers import run_config


def test_guard_passes_steady_rounds_and_stops_a_blow_up():
    w0 = {"w": torch.ones(4)}
    guard = DivergenceGuard(w0)
    guard.observe(1, {"w": torch.ones(4) * 1.5})
    guard.observe(2, {"w": torch.ones(4) * 2.0})
    with pytest.raises(RunDiverged, match="round 3 diverged: the global weights moved by 12"):
        guard.observe(3, {"w": torch.ones(4) * 8.0})  # moved 12 > 10 x 1


def test_guard_stops_non_finite_weights_and_a_first_round_far_beyond_the_weights():
    with pytest.raises(RunDiverged, match="not finite"):
        DivergenceGuard({"w": torch.ones(2)}).observe(1, {"w": torch.tensor([1.0, math.inf])})
    with pytest.raises(RunDiverged, match="the initial weights norm"):
        DivergenceGuard({"w": torch.ones(4)}).observe(1, {"w": torch.ones(4) * 1e20})


@pytest.fixture
def attacker(monkeypatch):
    """Node 0 scales its reply by 1e20 (a modified ClientApp)."""
    from clients import handlers

    real = handlers.local_privacy

    def boosted(cfg, out, start, server_round, context):
        out = real(cfg, out, start, server_round, context)
        if int(context.node_config.get("partition-id", -1)) == 0:
            out = {k: v * 1e20 for k, v in out.items()}
        return out

    monkeypatch.setattr(handlers, "local_privacy", boosted)
    monkeypatch.setenv("FEDRAC_CACHE", os.environ.get("FEDRAC_CACHE", ""))


def _cfg(tmp_path, *overrides):
    return run_config(tmp_path, "num_clients=4", "num_rounds=3", "client.local_steps=2",
                      *overrides)


def test_an_unbounded_mean_wrecked_in_round_one_fails_naming_the_round(tmp_path, attacker):
    from fedrac.run import RunFailedError, run_experiment

    with pytest.raises(RunFailedError, match="round 1 diverged"):
        run_experiment(_cfg(tmp_path, "aggregation.max_update_norm=null"))


def test_the_default_mean_drops_the_boosted_update(tmp_path, attacker, caplog):
    from fedrac.run import run_experiment

    summary = run_experiment(_cfg(tmp_path))
    assert summary["status"] == "ok"
    assert "exceeds aggregation.max_update_norm=10x" in caplog.text


def test_guard_keeps_the_previous_weights_by_reference():
    """The previous round's weights are the server's read-only record views: no copy of the
    model (issue 19's one copy)."""
    w0 = {"w": torch.ones(3, 3)}
    guard = DivergenceGuard(w0)
    assert guard.previous["w"] is w0["w"]
    w1 = {"w": torch.full((3, 3), 1.1)}
    guard.observe(1, w1)
    assert guard.previous["w"] is w1["w"]


class _LargestNew(TorchDispatchMode):
    """Records the largest storage an op allocates (views of their inputs do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves(
            (args, kwargs)) if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


def test_guard_works_a_bounded_piece_at_a_time_with_the_same_norm(monkeypatch):
    """An 8 B model's embedding converted whole to float64 is a 4 GB transient: the guard's
    largest allocation is one CHUNK of float64, and the move it measures is the whole one."""
    monkeypatch.setattr(divergence, "CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    w0 = {"emb": torch.randn(300, 70, generator=g), "long": torch.randn(5000, generator=g),
          "wide": torch.randn(2, 2500, generator=g),
          "t": torch.randn(90, 80, generator=g).T, "step": torch.tensor(3)}
    w1 = {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
          for k, v in w0.items()}
    w1["t"] = w1["t"].T.contiguous().T  # non-contiguous again
    whole = math.sqrt(sum(float(torch.linalg.vector_norm(
        w1[k].double() - w0[k].double())) ** 2 for k in w0 if w0[k].is_floating_point()))
    guard = DivergenceGuard(w0)
    with _LargestNew() as spy:
        guard.observe(1, w1)
    assert 0 < spy.largest <= 1000 * 8
    assert guard.largest == pytest.approx(whole, rel=1e-12)
    assert divergence._norm(w0) == pytest.approx(math.sqrt(sum(
        float(torch.linalg.vector_norm(v.double())) ** 2 for v in w0.values()
        if v.is_floating_point())), rel=1e-12)
    w1["wide"][1, 2400] = math.nan
    with pytest.raises(RunDiverged, match=r"not finite \(wide\)"):
        guard.observe(2, w1)
