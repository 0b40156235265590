"""The spectrum monitor: rank, norms and singular values of W - W0; spectrum.csv of a run."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from fedrac.adapters import LayerSpec
from fedrac.run import run_experiment
from fedrac.server.spectrum import SpectrumMonitor, balance, layer_stats
from fedrac.settings.config import ConfigError
from tests.helpers import run_config


def _low_rank(m: int, n: int, values: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(values), generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_layer_stats_rank_norms_and_top_values():
    x = _low_rank(12, 9, [5.0, 2.0, 1e-2, 1e-5])
    stats = layer_stats(x, top_k=3, rank_tol=1e-3)
    assert stats["rank"] == 3  # 1e-5 is below 1e-3 * 5, 1e-2 is above
    assert stats["nuclear_norm"] == pytest.approx(5 + 2 + 1e-2 + 1e-5, rel=1e-10)
    assert stats["frobenius_norm"] == pytest.approx((25 + 4 + 1e-4 + 1e-10) ** 0.5, rel=1e-10)
    assert stats["top_singular_values"] == pytest.approx([5.0, 2.0, 1e-2], rel=1e-9)
    assert layer_stats(torch.zeros(4, 3))["rank"] == 0


def test_randomised_svd_of_a_big_low_rank_layer_matches_the_exact_one():
    x = _low_rank(300, 200, [9.0, 4.0, 3.0, 1.0, 0.5])
    exact = layer_stats(x, top_k=4, exact_max=1024)
    fast = layer_stats(x, top_k=4, exact_max=50)  # 200 > 50: torch.svd_lowrank
    assert fast["top_singular_values"] == pytest.approx(exact["top_singular_values"], rel=1e-5)
    assert fast["rank"] == exact["rank"] == 5
    assert fast["nuclear_norm"] == pytest.approx(exact["nuclear_norm"], rel=1e-5)


def test_balance_is_zero_for_balanced_factors_only():
    u, s, vh = torch.linalg.svd(_low_rank(6, 5, [3.0, 1.0]))
    b, a = u[:, :2] * s[:2].sqrt(), s[:2].sqrt()[:, None] * vh[:2]
    assert balance(a, b) == pytest.approx(0.0, abs=1e-12)
    assert balance(2 * a, b / 2) > 1.0


def test_monitor_writes_rows_of_w_minus_w0_every_k_rounds(tmp_path):
    spec = LayerSpec("lin", (4, 6))
    w0 = torch.randn(4, 6, dtype=torch.float64)
    mon = SpectrumMonitor(tmp_path, {"lin": spec}, {"lin.weight": w0}, every=2, num_rounds=5)
    for rnd in range(0, 6):
        x = _low_rank(4, 6, [1.0] * min(rnd, 4), seed=rnd) if rnd else torch.zeros(4, 6)
        mon.observe(rnd, {"lin.weight": w0 + x})
    mon.close()
    rows = list(csv.DictReader(open(tmp_path / "spectrum.csv")))
    assert [int(r["round"]) for r in rows] == [2, 4, 5]  # every 2 rounds and the last one
    assert [int(r["rank"]) for r in rows] == [2, 4, 4]  # of X = W - W0, not of W
    assert rows[0]["balance"] == ""
    assert mon.summary()["rounds_observed"] == 3
    off = SpectrumMonitor(tmp_path / "off", {"lin": spec}, {"lin.weight": w0}, every=0)
    assert off.observe(1, {"lin.weight": w0}) is None and off.summary() is None


def test_run_writes_spectrum_csv_matching_the_final_model(tmp_path):
    cfg = run_config(tmp_path, "num_clients=3", "num_rounds=2", "strategy=fedit",
                     "strategy.rank=2")
    summary = run_experiment(cfg)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "spectrum.csv")))
    layers = sorted({r["layer"] for r in rows})
    assert [int(r["round"]) for r in rows] == [1] * len(layers) + [2] * len(layers)
    # the final rows describe the saved model minus the pretrained weights
    from fedrac.models.pretrain import pretrained_state

    w0 = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], cfg["cache_dir"])
    final = load_file(str(out / "model.safetensors"))
    for r in rows[-len(layers):]:
        x = (final[f"{r['layer']}.weight"].double() - w0[f"{r['layer']}.weight"].double())
        s = torch.linalg.svdvals(x)
        assert float(r["nuclear_norm"]) == pytest.approx(float(s.sum()), rel=1e-5)
        assert int(r["rank"]) <= 2  # FedIT's update has the adapter's rank
        assert float(r["balance"]) >= 0.0  # FedIT keeps both factors
    spectrum = json.loads((out / "summary.json").read_text())["spectrum"]
    assert spectrum["rounds_observed"] == 2 and summary["spectrum"]["every"] == 1


def test_monitor_every_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="monitor_every=-1 is not allowed"):
        run_config(tmp_path, "monitor_every=-1")


def test_monitor_holds_w0_by_reference_not_a_float64_copy(tmp_path):
    """The server's W0 is read-only views of its record: a float64 copy per adapted layer
    would add twice the model to a run's memory (issue 19)."""
    spec = LayerSpec("lin", (4, 6))
    w0 = torch.randn(4, 6)
    mon = SpectrumMonitor(tmp_path, {"lin": spec}, {"lin.weight": w0}, every=1)
    assert mon.initial["lin"] is w0
    mon.close()
