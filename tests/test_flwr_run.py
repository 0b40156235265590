"""``flwr run .``: Flower's own local simulation from a fresh FLWR_HOME.

The fast tests check how the ServerApp matches ``num_clients`` to the simulation's SuperNodes;
the slow one runs ``flwr run .`` for real and stops every process it started (the managed
local SuperLink, its SuperExec, ``flwr-simulation`` and Ray), found by its own FLWR_HOME.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from fedrac.deploy import procs
from fedrac.deploy.local import flwr_exe, process_env
from fedrac.flower_apps import default_output_dir, match_simulated_nodes, sets_num_clients
from fedrac.settings.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_sets_num_clients_reads_the_overrides_only():
    assert sets_num_clients("num_rounds=2 num_clients=4")
    assert sets_num_clients("+num_clients=4")
    assert not sets_num_clients("num_rounds=2 partitioner.num_clients_x=3")
    assert not sets_num_clients("")


def test_unset_num_clients_follows_the_supernodes(capsys):
    cfg = {"num_clients": 10}
    match_simulated_nodes(cfg, "num_rounds=2", 2)
    assert cfg["num_clients"] == 2
    assert "num-supernodes=N" in capsys.readouterr().out


def test_a_given_num_clients_that_differs_stops_with_the_keys_to_change():
    cfg = {"num_clients": 10}
    with pytest.raises(ConfigError) as err:
        match_simulated_nodes(cfg, "num_clients=10", 2)
    msg = str(err.value)
    assert "num_clients=10" in msg and "num_clients=2" in msg and "num-supernodes=10" in msg
    cfg = {"num_clients": 2}
    match_simulated_nodes(cfg, "num_clients=2", 2)  # a match goes on
    assert cfg["num_clients"] == 2


def test_default_output_dir_is_absolute_and_per_run():
    a, b = default_output_dir(1), default_output_dir(2)
    assert Path(a).is_absolute() and a != b and a.endswith("run-1")


def _started_by(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (our FLWR_HOME), this one excepted."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in env and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _flwr_run(overrides: str, env: dict, timeout: float,
              *extra: str) -> subprocess.CompletedProcess:
    argv = [flwr_exe("flwr"), "run", ".", "--stream", *extra, "-c", f'overrides="{overrides}"']
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.stop([proc.pid], grace=2)
        out, _ = proc.communicate()
        pytest.fail(f"flwr run did not finish in {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds its processes in /proc")
def test_flwr_run_dot_uses_the_simulations_supernodes_and_leaves_nothing(tmp_path):
    home = tmp_path / "flwr-home"
    env = process_env(extra={
        "FLWR_HOME": str(home), "HOME": str(tmp_path / "home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(procs.free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(procs.free_port()),
        "FEDRAC_CACHE": os.environ.get("FEDRAC_CACHE") or str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    marker = f"FLWR_HOME={home}"
    try:
        bad = _flwr_run("num_clients=10 num_rounds=2", env, timeout=240)
        assert "num_clients=10 is not allowed on this simulation of 2 SuperNodes" in bad.stdout
        good = _flwr_run("num_rounds=2 client.local_steps=2", env, timeout=240)
        assert good.returncode == 0, good.stdout[-3000:]
        assert "fedrac: num_clients=2, the simulation's SuperNodes" in good.stdout
        runs = list((tmp_path / "home" / "fedrac-runs").glob("run-*/metrics.csv"))
        assert len(runs) == 1, good.stdout[-3000:]
        with runs[0].open() as f:
            rows = list(csv.DictReader(f))
        assert [r["round"] for r in rows] == ["0", "1", "2"]
        assert rows[-1]["clients"] == "2"
        # the README's form: more SuperNodes with --federation-config, num_clients agreeing
        three = _flwr_run(f"num_clients=3 num_rounds=1 client.local_steps=2 "
                          f"output_dir={tmp_path / 'three'}", env, 240,
                          "--federation-config", "num-supernodes=3")
        assert three.returncode == 0, three.stdout[-3000:]
        with (tmp_path / "three" / "metrics.csv").open() as f:
            assert [r["clients"] for r in csv.DictReader(f)] == ["0", "3"]
    finally:
        mine = _started_by(marker)
        procs.stop(mine, grace=5)
        left = [p for p in _started_by(marker) if procs.alive(p)]
        assert not left, f"left running: {left}"
