"""fedrac's real apps give bit-identical weights on the inline engine and on Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from fedrac.run import run_experiment
from fedrac.settings.config import conf_dir, validate

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, engine: str) -> dict:
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=[
            f"engine={engine}", "num_clients=4", "num_rounds=3", "client.local_steps=3",
            "strategy.download=delta", "pretrain.epochs=2", f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / engine}"])
    return validate(cfg)


@pytest.mark.slow
def test_inline_and_ray_give_identical_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Ray workers import this checkout
    summaries = {e: run_experiment(_cfg(tmp_path, e)) for e in ("inline", "simulation")}
    inline = load_file(str(tmp_path / "inline" / "model.safetensors"))
    ray = load_file(str(tmp_path / "simulation" / "model.safetensors"))
    assert inline.keys() == ray.keys()
    assert all((inline[k] == ray[k]).all() for k in inline)
    # Ray persisted each node's cache: only round 1 carried full weights, as inline
    down = {e: s["bytes_by_kind"]["down"] for e, s in summaries.items()}
    assert down["simulation"]["weights"] == down["inline"]["weights"] > 0
    assert down["simulation"]["deltas"] == down["inline"]["deltas"] > 0
