"""The `fedrac` command: bad input stops before any work; a short run writes every result."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def fedrac(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300):
    """Run ``python -m fedrac`` with the test's overrides; return the finished process."""
    return subprocess.run([sys.executable, "-m", "fedrac", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


BAD_INPUTS = [
    (["strategy=lora_xyz"], "strategy='lora_xyz' is not a known strategy; allowed: "),
    (["dataset=imagenet"], "dataset='imagenet' is not a known dataset; allowed: "),
    (["model=resnet"], "model='resnet' is not a known model; allowed: "),
    (["partitioner=zipf"], "partitioner='zipf' is not a known partitioner; allowed: "),
    (["strategy.rank=0"], "strategy.rank=0 is not allowed; allowed: an integer >= 1"),
    (["strategy.rank=8"], "strategy.rank=8 is larger than layer 'head' (64->5) allows; "
                          "allowed: 1..5"),
    (["num_clients=0"], "num_clients=0 is not allowed; allowed: an integer >= 1"),
    (["fraction_train=0"], "fraction_train=0 is not allowed; allowed: a number in (0, 1]"),
    (["fraction_train=1.5"], "fraction_train=1.5 is not allowed; allowed: a number in (0, 1]"),
    (["model.target_modules=[attn]"], "model.target_modules=['attn'] matches no Linear/Conv "
                                      "layer; allowed: names or globs over"),
    (["client.optimizer=lion"], "client.optimizer='lion' is not allowed; allowed: sgd, adamw"),
    (["strategy.sketch=uniform"], "strategy.sketch='uniform' is not allowed; allowed: gaussian"),
    (["strategy.train_factor=both"], "strategy.train_factor='both' is not allowed; allowed: "
                                     "A, B, auto"),
    (["device=tpu"], "device='tpu' is not allowed; allowed: cpu, cuda, cuda:N (a GPU index), "
                     "auto"),
    (["device=cuda:x"], "device='cuda:x' is not allowed; allowed: cpu, cuda, cuda:N"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_stops_with_one_line_naming_key_value_and_allowed(args, message, tmp_path,
                                                                    monkeypatch, capsys):
    from tests.helpers import cli_error

    err = cli_error(args, tmp_path, monkeypatch, capsys)
    assert len(err) == 1, err
    assert err[0].startswith("fedrac: error: ") and message in err[0], err[0]
    assert not (tmp_path / "cache").exists()  # no work was done


def test_cuda_devices_are_checked_against_the_machine(monkeypatch):
    import torch

    from fedrac.settings.config import ConfigError, check_device

    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda:1' is not allowed; allowed: cpu, auto "
                                          r"\(no CUDA device"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device='cuda:2' .* cuda:0..cuda:1 \(this machine "
                                          r"has 2 GPUs\)"):
        check_device("cuda:2")
    with pytest.raises(ConfigError, match=r"cuda with engine=simulation"):
        check_device("cuda:1", "simulation")


def test_home_and_variables_in_path_values_expand_unquoted(monkeypatch):
    from fedrac.settings.config import expand_paths

    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setenv("DATA", "/srv/my data")
    assert expand_paths(["dataset.path=~/data/x.csv", "num_rounds=3", "+x=~"]) == [
        "dataset.path=/home/u/data/x.csv", "num_rounds=3", "+x=/home/u"]
    assert expand_paths(["dataset.root=$DATA/mnist"]) == ["dataset.root='/srv/my data/mnist'"]
    assert expand_paths(["dataset.path=~/a.csv,~/b.csv"]) == [
        "dataset.path=/home/u/a.csv,/home/u/b.csv"]
    # Hydra's own syntax is left alone: interpolations, quoted values, deletions
    for item in ("cache_dir=${oc.env:HOME}", "dataset.path='~/x'", "~dataset.path", "-m"):
        assert expand_paths([item]) == [item]


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    proc = fedrac("strategy.rank=-3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("strategy.rank=-3 is not allowed; allowed: an integer >= 1")


def _check_outputs(out: Path, strategy: str, rounds: int) -> dict:
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == list(range(rounds + 1))
    for key in ("round", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down",
                "seconds"):
        assert key in rows[0]
    for r in rows[1:]:
        assert 0 <= float(r["eval_accuracy"]) <= 1 and math.isfinite(float(r["train_loss"]))
        assert int(r["bytes_up"]) > 0 and int(r["bytes_down"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["rounds"] == rounds
    assert summary["final_accuracy"] == pytest.approx(float(rows[-1]["eval_accuracy"]))
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight",
                          "head.bias"}
    assert (out / "curves.png").stat().st_size > 10_000
    return {"rows": rows, "summary": summary, "state": state}


def _bytes_per_kind(row: dict, direction: str) -> dict:
    prefix = f"bytes_{direction}_"
    return {k[len(prefix):]: int(v) for k, v in row.items() if k.startswith(prefix) and int(v)}


def test_inline_run_writes_results_and_rac_lora_uploads_only_factors(tmp_path):
    out = tmp_path / "rac"
    proc = fedrac("engine=inline", "num_rounds=4", "num_clients=4", f"output_dir={out}",
                  f"hydra.run.dir={tmp_path / 'h'}",
                  env={**__import__("os").environ, "FEDRAC_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "[round 4/4] acc" in proc.stdout and "| rac_lora r=1 |" in proc.stdout
    res = _check_outputs(out, "rac_lora", 4)
    row = res["rows"][1]
    assert set(_bytes_per_kind(row, "up")) == {"factors", "metrics"}
    assert set(_bytes_per_kind(row, "down")) == {"weights", "seeds", "config"}
    # rank 1, auto side: fc1 64x64 -> B (64), fc2 -> B (64), head 5x64 -> B (5) floats per client
    factor_floats = 4 * (64 + 64 + 5)
    up_factors = _bytes_per_kind(row, "up")["factors"]
    assert factor_floats * 4 < up_factors < factor_floats * 4 + 4 * 3 * 200  # + array headers
    assert _bytes_per_kind(row, "down")["weights"] > 20 * _bytes_per_kind(row, "up")["factors"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "rac_lora"])
def test_simulation_runtime_end_to_end(strategy, tmp_path):
    import os

    out = tmp_path / strategy
    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache"), "FLWR_HOME": str(tmp_path),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(ROOT)}
    proc = fedrac("engine=simulation", f"strategy={strategy}", "num_rounds=3", "num_clients=3",
                  f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h'}", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _check_outputs(out, strategy, 3)
    assert all(int(r["clients"]) == 3 for r in res["rows"][1:])
    up = _bytes_per_kind(res["rows"][1], "up")
    full = strategy == "fedavg"
    assert ("weights" in up) == full and ("factors" in up) != full


@pytest.mark.slow
def test_multirun_sweeps_strategies(tmp_path):
    import os

    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache")}
    proc = fedrac("-m", "engine=inline", "strategy=fedavg,rac_lora", "num_rounds=2",
                  "num_clients=3", f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert [json.loads(p.read_text())["strategy"] for p in summaries] == ["fedavg", "rac_lora"]


@pytest.mark.slow
def test_configs_are_found_after_a_non_editable_install(tmp_path):
    """Build the wheel, install it (no deps) into a folder, run from outside the checkout."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir),
                    str(ROOT)], check=True, timeout=600)
    wheel = next(wheel_dir.glob("fedrac-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=600)
    assert (target / "fedrac" / "conf" / "config.yaml").is_file()
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    probe = subprocess.run([sys.executable, "-c",
                            "import fedrac.settings.config as c; print(c.conf_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(target / "fedrac" / "conf")
    proc = subprocess.run([sys.executable, "-m", "fedrac", "strategy=fedavg", "--cfg", "job"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: fedavg" in proc.stdout and "num_rounds: 100" in proc.stdout


def test_pretraining_is_cached_and_reproducible(tmp_path):
    from fedrac.models.pretrain import pretrained_state

    cfg = dict(model={"name": "mlp", "hidden": [16], "target_modules": ["all"]},
               dataset={"name": "digits"}, pretrain={"epochs": 2, "lr": 0.01, "batch_size": 32,
                                                      "seed": 0})
    first = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], tmp_path / "a")
    again = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], tmp_path / "b")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert len(list((tmp_path / "a").glob("pretrained-*.safetensors"))) == 1
    cached = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], tmp_path / "a")
    assert all(torch.equal(first[k], cached[k]) for k in first)
