"""Batched clients (``engine.batched=true``, clients/batched.py): same results as one by one."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clients import batched
from clients.batched import _Client, fit, run_reason
from fedrac.models import build_model
from fedrac.run import run_experiment
from fedrac.settings.config import ConfigError
from fedrac.settings.typed import settings_of
from fedrac.training.local import TrainSettings, train_locally
from tests.helpers import run_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _run(tmp_path: Path, cache: Path, name: str, *overrides: str):
    cfg = run_config(tmp_path / name, "num_rounds=2", "pretrain.epochs=3", *overrides)
    cfg["cache_dir"] = str(cache)
    run_experiment(cfg)
    out = Path(cfg["output_dir"])
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return load_file(str(out / "model.safetensors")), rows


@pytest.fixture
def groups(monkeypatch) -> list[int]:
    """Sizes of the client groups the batched path trained (a silent fallback would leave
    it empty)."""
    seen: list[int] = []
    train_group = batched._train_group

    def spy(cfg, clients, device):
        seen.append(len(clients))
        return train_group(cfg, clients, device)

    monkeypatch.setattr(batched, "_train_group", spy)
    return seen


def _pair(tmp_path: Path, cache: Path, groups: list[int], *overrides: str):
    seq = _run(tmp_path, cache, "seq", *overrides)
    bat = _run(tmp_path, cache, "bat", "engine.batched=true", *overrides)
    assert groups == [10, 10]  # every round's 10 clients in one group
    for a, b in zip(seq[1], bat[1], strict=True):  # same records: the ledger agrees exactly
        assert {k: v for k, v in a.items() if k.startswith("bytes")} == \
            {k: v for k, v in b.items() if k.startswith("bytes")}
        if a["train_loss"]:
            assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
    return seq[0], bat[0]


def test_fedavg_batched_is_bit_identical(tmp_path: Path, cache: Path, groups) -> None:
    seq, bat = _pair(tmp_path, cache, groups, "strategy=fedavg")
    assert seq.keys() == bat.keys()
    assert all(torch.equal(seq[k], bat[k]) for k in seq)


@pytest.mark.parametrize("overrides", [
    ("strategy=rac_lora",),
    ("strategy=fedit", "client.optimizer=sgd", "client.momentum=0.9",
     "client.weight_decay=0.01"),
])
def test_lora_methods_batched_match_to_float_rounding(tmp_path: Path, cache: Path, groups,
                                                      overrides: tuple[str, ...]) -> None:
    seq, bat = _pair(tmp_path, cache, groups, *overrides)
    assert seq.keys() == bat.keys()
    for k in seq:  # the factor's gradient goes through one batched BLAS call: last bits differ
        torch.testing.assert_close(bat[k], seq[k], rtol=1e-5, atol=1e-6)


def _client(x, y, seed, settings, start):
    return _Client(None, x, y, seed, settings, "full", dict(start), {}, "k")


@pytest.mark.parametrize("settings", [
    TrainSettings(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01, batch_size=16),
    TrainSettings(optimizer="adamw", lr=0.02, weight_decay=0.01, batch_size=16,
                  warmup_steps=2),
    TrainSettings(optimizer="adamw", lr=0.02, local_steps=5, batch_size=8),
])
def test_fit_equals_train_locally(settings: TrainSettings) -> None:
    """Unequal data sizes (so unequal step counts and short last batches), per-client
    optimizer state: each client's weights are those of the sequential loop, to float
    rounding (a batched matrix product may round differently from the per-client one)."""
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, (12,), 3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(n, 12), torch.randint(0, 3, (n,))) for n in (37, 16, 50, 5)]
    clients = [_client(x, y, 10 + i, settings, start) for i, (x, y) in enumerate(data)]
    outs, results = fit(model, clients, torch.device("cpu"))
    for i, (x, y) in enumerate(data):
        model.load_state_dict(start)
        for p in model.parameters():
            p.requires_grad_(True)
        ref = train_locally(model, x, y, settings, 10 + i, torch.device("cpu"))
        assert results[i][1] == ref.steps
        assert results[i][0] == pytest.approx(ref.loss, rel=1e-5)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(outs[i][k], v, rtol=1e-5, atol=1e-6)


def test_clipped_gradients_match_to_rounding() -> None:
    torch.manual_seed(1)
    settings = TrainSettings(optimizer="sgd", lr=0.1, batch_size=8, max_grad_norm=0.05)
    model = build_model({"name": "mlp", "hidden": [16]}, (12,), 3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(n, 12), torch.randint(0, 3, (n,))) for n in (20, 33)]
    outs, _ = fit(model, [_client(x, y, i, settings, start) for i, (x, y) in enumerate(data)],
                  torch.device("cpu"))
    for i, (x, y) in enumerate(data):
        model.load_state_dict(start)
        for p in model.parameters():
            p.requires_grad_(True)
        train_locally(model, x, y, settings, i, torch.device("cpu"))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(outs[i][k], v, rtol=1e-5, atol=1e-7)


def test_failed_batch_falls_back_to_the_clientapp(tmp_path: Path, cache: Path, monkeypatch,
                                                  caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no batch today")

    seq = _run(tmp_path, cache, "seq", "strategy=fedavg")[0]
    monkeypatch.setattr(batched, "_train_group", broken)
    with caplog.at_level(logging.WARNING):
        bat = _run(tmp_path, cache, "bat", "strategy=fedavg", "engine.batched=true")[0]
    assert all(torch.equal(seq[k], bat[k]) for k in seq)
    assert "engine.batched: the batch failed (RuntimeError: no batch today)" in caplog.text


def test_what_cannot_be_batched_names_why(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, "engine.batched=true")

    def reason(**changed):
        return run_reason(settings_of({**cfg, **changed}))

    assert reason() is None
    assert "local_dp" in reason(privacy={"mode": "local_dp"})
    assert "secagg=plus" in reason(secagg={"name": "plus"})
    assert "custom model" in reason(model={**cfg["model"], "_target_": "my.Net"})
    assert "model=hf" in reason(model={**cfg["model"], "name": "hf"})


def test_batched_needs_the_inline_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine\.batched=True .*need engine=inline"):
        run_config(tmp_path, "engine=simulation", "+engine.batched=true")
    with pytest.raises(ConfigError, match=r"engine\.batched='yes' .*allowed: true, false"):
        run_config(tmp_path, "engine.batched=yes")
