"""Checkpoints and resume: an interrupted run, resumed, ends bit-identical to a whole one."""

from __future__ import annotations

import csv
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrac.server import checkpoint as ck
from fedrac.settings.config import ConfigError
from tests.helpers import run_config

TIMING = {"seconds", "client_seconds"}
FAST = ["num_rounds=4", "num_clients=3", "client.local_steps=2", "pretrain.epochs=2",
        "progress=lines"]
CASES = {
    "rac_lora": ["strategy=rac_lora"],
    "fedit": ["strategy=fedit"],
    "fedavg": ["strategy=fedavg"],
    "rac_lora_delta": ["strategy=rac_lora", "strategy.download=delta", "fraction_train=0.67"],
    "fedex_lora_delta": ["strategy=fedex_lora", "strategy.download=delta", "fraction_train=0.67"],
    "ffa_lora": ["strategy=ffa_lora"],
    "cola": ["strategy=cola"],
    "fedex_lora": ["strategy=fedex_lora"],
    "flora": ["strategy=flora"],
    "rac_lora_batched": ["strategy=rac_lora", "engine.batched=true"],
}


def rows(out: Path) -> list[dict[str, str]]:
    """metrics.csv without the timing columns."""
    with (out / "metrics.csv").open() as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def config(tmp_path: Path, cache: Path, name: str, *extra: str) -> dict:
    cfg = run_config(tmp_path, *FAST, *CASES[name], *extra)
    cfg["cache_dir"] = str(cache)
    return cfg


def test_state_tree_round_trip(tmp_path):
    """Tensors (any dtype), bytes, tuples, NaN and int keys survive a checkpoint; key order too."""
    state = {"w": {"b": torch.arange(3, dtype=torch.float64), "a": torch.ones(2, 2).bfloat16()},
             "blob": b"\x00\x01", "empty": b"", "t": (1, [2.5, math.nan]), "none": None,
             "shared": torch.zeros(4)}
    state["alias"] = state["shared"]
    ck.save_checkpoint(tmp_path, state)
    back = ck.load_checkpoint(tmp_path)
    assert list(back["w"]) == ["b", "a"]
    assert torch.equal(back["w"]["b"], state["w"]["b"]) and back["w"]["a"].dtype == torch.bfloat16
    assert back["blob"] == b"\x00\x01" and back["empty"] == b"" and back["none"] is None
    assert back["t"][0] == 1 and math.isnan(back["t"][1][1])
    assert not list((tmp_path / ck.FOLDER).glob(".*tmp*"))


def test_rng_states_restored():
    saved = ck.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def run_interrupted(cfg: dict, at: int, monkeypatch) -> dict:
    """Run ``cfg`` with SIGINT 'arriving' during round ``at``; returns its summary."""
    from fedrac.run import run_experiment
    from fedrac.server.results import RunRecorder

    log_round = RunRecorder.log_round

    def log_and_signal(self, server_round, *args):
        if server_round == at:
            ck.STOP.set(signal.SIGINT)
        return log_round(self, server_round, *args)

    monkeypatch.setattr(RunRecorder, "log_round", log_and_signal)
    try:
        return run_experiment(cfg)
    finally:
        monkeypatch.setattr(RunRecorder, "log_round", log_round)
        ck.STOP.clear()


@pytest.mark.parametrize("name", list(CASES))
def test_interrupt_and_resume_is_bit_identical(tmp_path, cache, monkeypatch, name):
    """Stopped after round 2 of 4 and resumed: the same model bytes and metrics rows."""
    from fedrac.run import run_experiment

    full = config(tmp_path / "full", cache, name)
    run_experiment(full)
    cut = config(tmp_path / "cut", cache, name)
    summary = run_interrupted(cut, 2, monkeypatch)
    out = Path(cut["output_dir"])
    assert summary["interrupted"] and summary["interrupted_after_round"] == 2
    assert summary["signal"] == "SIGINT" and summary["rounds"] == 2
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()
    resumed = ck.resume_config(out, [f"resume={out}"], {})
    assert resumed["output_dir"] == str(out) and resumed["resume"] == str(out)
    summary = run_experiment(resumed)
    assert not summary.get("interrupted") and summary["checkpoints"] == 4
    full_out = Path(full["output_dir"])
    assert rows(out) == rows(full_out)
    assert (out / "spectrum.csv").read_text() == (full_out / "spectrum.csv").read_text()
    assert (out / "model.safetensors").read_bytes() == (full_out / "model.safetensors").read_bytes()


def test_resume_refuses_trajectory_overrides(tmp_path):
    folder = tmp_path / "run"
    ck.save_run_config(folder, {"num_rounds": 5, "privacy": {"name": "none"}})
    with pytest.raises(ConfigError, match=r"^strategy\.rank='2' is not allowed; allowed: with "):
        ck.resume_config(folder, [f"resume={folder}", "strategy.rank=2"], {})
    with pytest.raises(ConfigError, match=r"^strategy='fedavg' is not allowed"):
        ck.resume_config(folder, ["strategy=fedavg"], {})
    with pytest.raises(ConfigError, match=r"^num_rounds=3 is not allowed; allowed: an integer >= 5"
                       ):
        ck.resume_config(folder, ["num_rounds=3"], {"num_rounds": 3})
    cfg = ck.resume_config(folder, ["num_rounds=9", "progress=bar"],
                           {"num_rounds": 9, "progress": "bar"})
    assert cfg["num_rounds"] == 9 and cfg["progress"] == "bar"
    with pytest.raises(ConfigError, match="^resume="):
        ck.resume_config(tmp_path / "nothing", [], {})


def start_cli(tmp_path: Path, cache: Path, *overrides: str):
    """``python -m fedrac <overrides>`` in a subprocess (stdout piped, line by line)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedrac", *overrides, f"cache_dir={cache}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])


def signal_at_round(proc, at: int, signum: int) -> tuple[str, str]:
    """Send ``signum`` once round ``at``'s progress line appears; the process's output."""
    import re

    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(rf"\[round +{at}/", line):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    return "".join(seen) + out, err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rac_lora", "fedit", "fedavg", "rac_lora_delta"])
def test_sigkill_then_resume_from_the_cli(tmp_path, cache, name):
    """SIGKILL in round 3 of 6, then ``fedrac resume=<dir>``: bit-identical to a whole run."""
    from fedrac.run import run_experiment

    full = config(tmp_path / "full", cache, name, "num_rounds=6")
    run_experiment(full)
    out = tmp_path / "cut"
    overrides = [*FAST, *CASES[name], "num_rounds=6", "engine=inline", f"output_dir={out}"]
    proc = start_cli(tmp_path, cache, *overrides)
    signal_at_round(proc, 3, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    proc = start_cli(tmp_path, cache, f"resume={out}")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "fedrac: resuming" in stdout
    full_out = Path(full["output_dir"])
    assert rows(out) == rows(full_out)
    assert (out / "model.safetensors").read_bytes() == (full_out / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigint_finishes_the_round_and_says_how_to_resume(tmp_path, cache):
    """SIGINT in round 2: exit 130, results and checkpoint written, one resume line, no
    traceback; resuming ends as the whole run does."""
    import json

    from fedrac.run import run_experiment

    full = config(tmp_path / "full", cache, "rac_lora")
    run_experiment(full)
    out = tmp_path / "cut"
    proc = start_cli(tmp_path, cache, *FAST, *CASES["rac_lora"], "engine=inline",
                     f"output_dir={out}")
    stdout, stderr = signal_at_round(proc, 2, signal.SIGINT)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr + stdout
    hints = [line for line in stdout.splitlines() if "fedrac resume=" in line]
    assert hints == [f"fedrac: interrupted after round 2; results so far in {out}; "
                     f"continue with: fedrac resume={out}"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["rounds"] == 2
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()
    run_experiment(ck.resume_config(out, [], {}))
    full_out = Path(full["output_dir"])
    assert rows(out) == rows(full_out)
    assert (out / "model.safetensors").read_bytes() == (full_out / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_resume_on_ray(tmp_path, cache, monkeypatch):
    """engine=simulation: stopped after round 2 of 4 and resumed on Ray, the rows and model of
    a whole inline run, up to the last bit (Ray keeps no node state fedrac needs without
    download=delta; with it, the nodes get full weights in the first round after resuming)."""
    from fedrac.run import run_experiment

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    full = config(tmp_path / "full", cache, "rac_lora")
    run_experiment(full)
    cut = config(tmp_path / "cut", cache, "rac_lora", "engine=simulation")
    assert run_interrupted(cut, 2, monkeypatch)["interrupted"]
    run_experiment(ck.resume_config(cut["output_dir"], [], {}))
    out, full_out = Path(cut["output_dir"]), Path(full["output_dir"])
    # Ray hands replies over in the order its actors finish: sums may differ in the last bit
    got, want = rows(out), rows(full_out)
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            assert g[key] == value or float(g[key]) == pytest.approx(float(value), rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(full_out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_resume_accepts_overrides_the_run_already_had(tmp_path):
    """Under flwr run every process composes the same overrides: the run's own are accepted."""
    folder = tmp_path / "run"
    ck.save_run_config(folder, {"num_rounds": 5, "strategy": {"name": "fedit", "rank": 4}})
    given = {"num_rounds": 5, "strategy": {"name": "fedit", "rank": 4}}
    cfg = ck.resume_config(folder, ["strategy=fedit", "strategy.rank=4"], given)
    assert cfg["strategy"] == {"name": "fedit", "rank": 4}
    given["strategy"]["rank"] = 2
    with pytest.raises(ConfigError, match=r"^strategy\.rank='2' is not allowed"):
        ck.resume_config(folder, ["strategy=fedit", "strategy.rank=2"], given)


def test_deployment_resume_needs_the_runs_own_overrides():
    saved = {"num_rounds": 5, "seed": 1, "strategy": {"name": "fedit", "rank": 4},
             "output_dir": "/a", "min_available_clients": 1}
    ck.check_same_run(saved, {**saved, "num_rounds": 9, "output_dir": "/b",
                              "min_available_clients": None})
    with pytest.raises(ConfigError, match=r"^strategy\.rank=2 is not allowed; allowed: 4, the "):
        ck.check_same_run(saved, {**saved, "strategy": {"name": "fedit", "rank": 2}})


def test_resumed_deployment_nodes_compose_the_runs_own_overrides(tmp_path):
    """Under ``flwr run`` with ``resume=DIR`` the nodes take the run's overrides (saved in
    ``DIR/.hydra/overrides.yaml``) from the message, with the new ``num_rounds``."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Context, RecordDict

    from fedrac.flower_apps import node_config, run_overrides, save_resolved_config

    out = tmp_path / "run"
    own = f"num_clients=2 strategy.rank=2 num_rounds=2 output_dir={out}"
    save_resolved_config({"output_dir": str(out)}, own)
    wire = run_overrides(out, f"resume={out} num_rounds=5")
    assert wire == f"num_clients=2 strategy.rank=2 output_dir={out} num_rounds=5"
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config={"overrides": f"resume={out} num_rounds=5"})
    msg = SimpleNamespace(content=RecordDict({"config": ConfigRecord({"run-overrides": wire})}))
    cfg = node_config(msg, context)
    assert cfg["num_clients"] == 2 and cfg["strategy"]["rank"] == 2 and cfg["num_rounds"] == 5
    bare = SimpleNamespace(content=RecordDict({"config": ConfigRecord({})}))
    with pytest.raises(ConfigError, match="resumes a run, but the message carries no"):
        node_config(bare, context)
