"""client.weight_decay_mode: coupled decay on LoRA factors is the nuclear-norm penalty."""

from __future__ import annotations

import pytest
import torch

from clients.handlers import settings_from
from fedrac.settings.config import ConfigError
from fedrac.settings.typed import settings_of
from fedrac.training.local import SGDW, TrainSettings, make_optimizer
from strategies.base import client_config_record
from tests.helpers import run_config


def _target(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor([3.0, 1.5, 0.4], dtype=torch.float64)) @ v.T


def _fit(settings: TrainSettings, steps: int, scale: float = 2.0) -> torch.Tensor:
    """Train ``X = s B A`` (rank 3) on ``1/2 ||X - M||^2`` from a small init; return X."""
    gen = torch.Generator().manual_seed(1)
    b = torch.nn.Parameter(1e-2 * torch.randn(6, 3, generator=gen, dtype=torch.float64))
    a = torch.nn.Parameter(1e-2 * torch.randn(3, 5, generator=gen, dtype=torch.float64))
    opt = make_optimizer([a, b], settings)
    m = _target()
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((scale * b @ a - m) ** 2).sum()
        loss.backward()
        opt.step()
    return (scale * b @ a).detach()


def test_coupled_decay_on_the_factors_is_the_nuclear_norm_penalty():
    # min_X 1/2 ||X - M||^2 + (lam / s) ||X||_* is singular-value thresholding of M at lam / s
    lam, s = 0.6, 2.0
    x = _fit(TrainSettings(optimizer="sgd", lr=0.05, weight_decay=lam,
                           weight_decay_mode="coupled"), 4000, s)
    expected = (torch.tensor([3.0, 1.5, 0.4], dtype=torch.float64) - lam / s).clamp(min=0)
    assert torch.linalg.svdvals(x)[:3] == pytest.approx(expected.tolist(), abs=1e-6)
    # Adam with coupled (L2) decay has the same stationary points
    xa = _fit(TrainSettings(optimizer="adamw", lr=2e-3, weight_decay=lam,
                            weight_decay_mode="coupled"), 6000, s)
    assert torch.linalg.svdvals(xa)[:3] == pytest.approx(expected.tolist(), abs=2e-3)
    # AdamW's decoupled decay minimises no such penalty: its point is elsewhere
    xd = _fit(TrainSettings(optimizer="adamw", lr=2e-3, weight_decay=lam,
                            weight_decay_mode="decoupled"), 6000, s)
    assert float((torch.linalg.svdvals(xd)[:3] - expected).abs().max()) > 0.05


def test_decoupled_sgd_equals_coupled_without_momentum_and_differs_with_it():
    plain = dict(optimizer="sgd", lr=0.05, weight_decay=0.3)
    c = _fit(TrainSettings(**plain, weight_decay_mode="coupled"), 50)
    d = _fit(TrainSettings(**plain, weight_decay_mode="decoupled"), 50)
    assert torch.allclose(c, d, atol=1e-12)
    cm = _fit(TrainSettings(**plain, momentum=0.9, weight_decay_mode="coupled"), 50)
    dm = _fit(TrainSettings(**plain, momentum=0.9, weight_decay_mode="decoupled"), 50)
    assert float((cm - dm).abs().max()) > 1e-4


def test_auto_keeps_each_optimizers_own_decay():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(p, TrainSettings(optimizer="adamw"))) is torch.optim.AdamW
    assert type(make_optimizer(p, TrainSettings(optimizer="sgd"))) is torch.optim.SGD
    assert type(make_optimizer(p, TrainSettings(optimizer="adamw", weight_decay_mode="coupled"))
                ) is torch.optim.Adam
    assert type(make_optimizer(p, TrainSettings(optimizer="sgd", weight_decay_mode="decoupled"))
                ) is SGDW


def test_weight_decay_mode_travels_to_clients_and_is_validated(tmp_path):
    cfg = run_config(tmp_path, "client.weight_decay_mode=coupled", "client.weight_decay=0.1")
    record = client_config_record(settings_of(cfg).client)
    assert record["weight-decay-mode"] == "coupled"
    assert settings_from(record).weight_decay_mode == "coupled"
    assert "weight-decay-mode" not in client_config_record(settings_of(run_config(tmp_path)).client)
    with pytest.raises(ConfigError, match="client.weight_decay_mode='l2' is not allowed"):
        run_config(tmp_path, "client.weight_decay_mode=l2")
