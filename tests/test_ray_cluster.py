"""``engine=simulation engine.address=...`` joins a running multi-node Ray cluster.

The test starts a two-node Ray cluster on 127.0.0.1 (``ray start --head`` and a second
``ray start --address``, both ``--block`` so that they are this test's child processes),
runs fedrac on it, and stops exactly those processes and their children by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrac.deploy import procs

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _ray(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return procs.spawn([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                       log, env)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


@pytest.fixture
def ray_cluster(tmp_path):
    """A head and a second node (1 CPU each) on 127.0.0.1; yields the head's address."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    port = procs.free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    address = f"127.0.0.1:{port}"
    started = []
    try:
        started.append(_ray(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "1", "--include-dashboard", "false",
                             "--temp-dir", str(temp)], tmp_path / "head.log", env))
        deadline = time.monotonic() + 120
        while not procs.port_open("127.0.0.1", port):
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        started.append(_ray(["--address", address, "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1"], tmp_path / "node.log", env))
        while _alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        procs.stop([p.pid for p in started], grace=20)


def test_simulation_joins_a_two_node_ray_cluster(ray_cluster, tmp_path):
    common = ["strategy=rac_lora", "num_clients=4", "num_rounds=2", "client.local_steps=2",
              "seed=5"]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cluster"
    done = subprocess.run([sys.executable, "-m", "fedrac", *common, "engine=simulation",
                           f"engine.address={ray_cluster}", "engine.client_resources.num_cpus=1",
                           f"output_dir={out}"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "summary.json").is_file()
    ref = tmp_path / "inline"
    subprocess.run([sys.executable, "-m", "fedrac", *common, f"output_dir={ref}"], check=True,
                   capture_output=True, env=env, timeout=600)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_ray_address_is_refused_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedrac", "engine=simulation",
                           "engine.address=no-port", f"output_dir={tmp_path / 'x'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "engine.address='no-port' is not allowed" in done.stderr + done.stdout
    assert not (tmp_path / "x" / "metrics.csv").exists()
