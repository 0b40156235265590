"""A multirun runs each distinct job once (fedavg is not re-run for each strategy.rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_config

from fedrac.experiments import dedup

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, name: str, *overrides: str) -> dict:
    """A job of one sweep: its own output folder, the sweep's cache."""
    cfg = run_config(tmp_path / name, *overrides)
    cfg["cache_dir"] = str(tmp_path / "cache")
    return cfg


def test_only_keys_the_strategy_ignores_make_jobs_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "_seen", {})
    key = {}
    for name, over in [("fedavg1", ["strategy=fedavg", "strategy.rank=1"]),
                       ("fedavg4", ["strategy=fedavg", "strategy.rank=4"]),
                       ("fedavg_seed1", ["strategy=fedavg", "seed=1"]),
                       ("rac1", ["strategy=rac_lora", "strategy.rank=1"]),
                       ("rac4", ["strategy=rac_lora", "strategy.rank=4"])]:
        cfg = _cfg(tmp_path, name, *over)
        key[name] = dedup.effective_key(cfg, "sweep")
    assert key["fedavg1"] == key["fedavg4"]
    assert len({key["fedavg1"], key["fedavg_seed1"], key["rac1"], key["rac4"]}) == 4
    first = _cfg(tmp_path, "a", "strategy=fedavg", "strategy.rank=1")
    assert dedup.earlier_job(first, "sweep") is None
    second = _cfg(tmp_path, "b", "strategy=fedavg", "strategy.rank=4")
    assert dedup.earlier_job(second, "other-sweep") is None  # another sweep: runs again
    assert dedup.earlier_job(second, "sweep") is None  # the first left no results: run it
    Path(second["output_dir"]).mkdir(parents=True)
    (Path(second["output_dir"]) / "summary.json").write_text('{"final_accuracy": 0.5}')
    third = _cfg(tmp_path, "c", "strategy=fedavg", "strategy.rank=2")
    assert dedup.earlier_job(third, "sweep") == Path(second["output_dir"])
    (Path(second["output_dir"]) / "fedrac.log").write_text("log")
    copied = dedup.reuse(Path(second["output_dir"]), third["output_dir"])
    assert copied == {"final_accuracy": 0.5}
    assert sorted(p.name for p in Path(third["output_dir"]).iterdir()) == ["summary.json"]
    tracked = _cfg(tmp_path, "d", "strategy=fedavg", "strategy.rank=4", "logger=tensorboard")
    assert dedup.earlier_job(tracked, "sweep") is None  # each tracked job keeps its own run


@pytest.mark.slow
def test_a_sweep_copies_the_identical_fedavg_job_instead_of_running_it(tmp_path):
    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "fedrac", "-m", "strategy=fedavg,rac_lora",
                           "strategy.rank=1,4", "num_rounds=2", "num_clients=3",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[round 2/2]") == 3  # three distinct jobs ran
    assert proc.stdout.count("results copied") == 1
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert [s["strategy"] for s in summaries] == ["fedavg", "fedavg", "rac_lora", "rac_lora"]
    assert summaries[0] == summaries[1]
    assert (jobs[1] / "metrics.csv").read_text() == (jobs[0] / "metrics.csv").read_text()
    assert (jobs[1] / "model.safetensors").is_file()
    assert "gap to FPFT" in (sweep / "comparison.md").read_text()
