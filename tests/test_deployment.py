"""Real Flower processes: SuperLink + SuperNodes on 127.0.0.1, driven by ``flwr run``.

Every test stops every process it started (fixture finalizers), pass or fail.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrac.deploy import procs
from fedrac.deploy.certs import make_node_keys
from fedrac.deploy.local import (
    Federation,
    down,
    flwr_cli,
    flwr_exe,
    online_nodes,
    process_env,
    start_node,
    supernode_command,
    up,
)
from fedrac.flower_apps import deployment_config
from fedrac.run import run_experiment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FAST = "client.local_steps=2 seed=3"  # tiny rounds: deployment time is process overhead


@pytest.fixture
def flwr_env(tmp_path, monkeypatch):
    """Flower's config in a tmp FLWR_HOME; no runtime dependency installation (no network)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FEDRAC_CACHE", os.environ.get("FEDRAC_CACHE")
                       or str(tmp_path.parent / "fedrac-cache"))
    return tmp_path


@pytest.fixture
def federation(flwr_env):
    """Factory: ``start(nodes, tls=..., auth=...)``; extra PIDs go to ``started``."""
    started: list[Federation] = []
    extra: list[int] = []

    def start(nodes: int, **kwargs) -> Federation:
        kwargs.setdefault("run_as", None)  # as the caller (tests/test_deploy_run_as.py: root)
        fed = up(flwr_env / f"fed{len(started)}", nodes, **kwargs)
        started.append(fed)
        return fed

    start.extra = extra
    yield start
    procs.stop(extra, grace=5)
    for fed in started:
        if (Path(fed.dir) / "federation.json").exists():
            down(fed.dir)


def flwr_run(fed: Federation, overrides: str, **popen) -> subprocess.Popen:
    """``flwr run <repo> <connection> --stream -c overrides="..."`` in the background."""
    argv = [flwr_exe("flwr"), "run", str(REPO), fed.connection, "--stream",
            "-c", f"overrides={json.dumps(overrides)}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=process_env(), **popen)


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_insecure_flwr_run_matches_inline(federation, flwr_env):
    fed = federation(2)
    out = flwr_env / "out"
    overrides = f"strategy=rac_lora num_rounds=3 num_clients=2 {FAST} output_dir={out}"
    run = flwr_run(fed, overrides)
    log, _ = run.communicate(timeout=240)
    assert run.returncode == 0, log
    table = rows(out)
    assert [int(r["round"]) for r in table] == [0, 1, 2, 3]
    assert all(int(r["clients"]) == 2 and int(r["failed"]) == 0 for r in table[1:]), log
    assert all(int(r["bytes_up_factors"]) > 0 for r in table[1:])
    for name in ("summary.json", "model.safetensors", "curves.png", ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    # The same overrides on the in-process engine give the same model (same code, seeds).
    ref = flwr_env / "ref"
    cfg = deployment_config({"overrides": overrides.replace(str(out), str(ref))})
    run_experiment({**cfg, "engine": {"name": "inline"}})
    deployed, inline = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert deployed.keys() == inline.keys()
    for key in deployed:
        torch.testing.assert_close(deployed[key], inline[key], rtol=1e-5, atol=1e-6)
    acc = json.loads((out / "summary.json").read_text())["final_accuracy"]
    assert acc == pytest.approx(json.loads((ref / "summary.json").read_text())["final_accuracy"])


def test_tls_refuses_clients_without_the_ca(federation, flwr_env):
    fed = federation(1, tls=True)
    assert len(online_nodes(fed.connection)) == 1  # a SuperNode with the CA got in over TLS
    log = flwr_env / "no-ca.log"
    argv = supernode_command(fed.address, procs.free_port(), {"partition-id": 1}, root_cert=None)
    argv = [a for a in argv if a != "--insecure"] + ["--max-wait-time", "20"]
    node = procs.spawn(argv, log, process_env())
    federation.extra.append(node.pid)
    assert node.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log.read_text()
    # The CLI without the CA is refused too (system CAs do not know the local CA).
    config = Path(fed.flwr_home) / "config.toml"
    config.write_text(config.read_text() + f'\n[superlink.no-ca]\naddress = "{fed.address}"\n')
    res = flwr_cli(["supernode", "list", "no-ca"])
    assert res.returncode != 0 and "node-id" not in res.stdout
    assert len(online_nodes(fed.connection)) == 1


def test_supernode_auth_refuses_unregistered_keys(federation, flwr_env):
    fed = federation(1, auth=True)  # supernode-0's public key was registered by `up`
    assert len(online_nodes(fed.connection)) == 1
    key, _ = make_node_keys(flwr_env / "keys", "intruder")  # never registered
    log = flwr_env / "intruder.log"
    argv = supernode_command(fed.address, procs.free_port(), {"partition-id": 1},
                             root_cert=fed.root_cert, private_key=key)
    node = procs.spawn([*argv, "--max-wait-time", "20"], log, process_env())
    federation.extra.append(node.pid)
    assert node.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in log.read_text()
    assert "No SuperNode found with the given public key" in fed.log("superlink").read_text()
    assert len(online_nodes(fed.connection)) == 1


def test_killed_supernode_run_completes_and_log_names_it(federation, flwr_env):
    """Node 1 is killed (SIGKILL) after round 1 and restarted at once: round 2 ends without
    it and the log names it; round 3 has it back (under a new node id)."""
    fed = federation(2)
    before = set(online_nodes(fed.connection))
    out = flwr_env / "out"
    run = flwr_run(fed, f"num_rounds=3 num_clients=2 round_timeout=60 {FAST} output_dir={out}")
    try:
        deadline = time.monotonic() + 150
        while not ((out / "metrics.csv").exists() and len(rows(out)) >= 2):
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        victim = fed.node_pids["supernode-1"]
        for pid in [victim, *procs.descendants(victim)]:
            os.kill(pid, signal.SIGKILL)
        fed.node_ports.pop("supernode-1")
        start_node(fed, "supernode-1", fed.node_configs["supernode-1"])
        log, _ = run.communicate(timeout=200)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, log
    table = rows(out)
    assert [int(r["round"]) for r in table] == [0, 1, 2, 3]
    assert int(table[1]["clients"]) == 2
    assert int(table[2]["clients"]) == 1 and int(table[2]["failed"]) == 1, log
    assert int(table[3]["clients"]) == 2, log  # the restarted node takes part again
    assert (out / "summary.json").is_file()
    dropped = {int(n) for n in before
               if f"round 2: node {n} did not reply" in log or f"round 2: node {n} failed" in log}
    assert len(dropped) == 1, log


def _worker_pids(fed: Federation) -> dict[str, list[int]]:
    from fedrac.deploy.worker import worker_pids

    return {name: sorted(worker_pids(fed.worker_dir(name))) for name in fed.node_pids}


def _inline_model(overrides: str, out: Path, ref: Path) -> dict:
    cfg = deployment_config({"overrides": overrides.replace(str(out), str(ref))})
    run_experiment({**cfg, "engine": {"name": "inline"}})
    return load_file(ref / "model.safetensors")


def _assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same code, same seeds: bit-identical


@pytest.mark.parametrize("download", ["full", "delta"])
def test_warm_workers_give_the_inline_result(federation, flwr_env, download):
    """One warm worker per node serves every round of the run (its round time is measured
    by ``python -m bench.peers``, not asserted here); the model is bit-identical to the
    inline engine's. With ``download=delta`` the worker holds the node's cached weights:
    after round 1 the nodes get deltas only, never a resync."""
    fed = federation(2)
    out = flwr_env / "out"
    overrides = f"strategy=rac_lora num_rounds=5 num_clients=2 {FAST} output_dir={out} " \
        f"strategy.download={download}"
    run = flwr_run(fed, overrides)
    log, _ = run.communicate(timeout=240)
    assert run.returncode == 0, log
    pids = _worker_pids(fed)
    assert all(len(p) == 1 for p in pids.values()), pids  # one worker per node, kept warm
    from fedrac.deploy.worker import socket_path

    for name, folder in ((n, fed.worker_dir(n)) for n in fed.node_pids):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", name
        runs = [int(p.stem.split("-")[1]) for p in folder.glob("run-*.pid")]
        assert len(runs) == 1
        sock = socket_path(folder, runs[0])
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    _assert_same_model(load_file(out / "model.safetensors"),
                       _inline_model(overrides, out, flwr_env / "ref"))
    if download == "delta":
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        later = [r for r in rows if int(r["round"]) >= 2]
        assert all(int(r["bytes_down_weights"]) == 0 and int(r["bytes_down_deltas"]) > 0
                   for r in later), later


def test_killed_worker_is_restarted_and_the_run_goes_on(federation, flwr_env):
    fed = federation(2)
    out = flwr_env / "out"
    overrides = f"num_rounds=4 num_clients=2 round_timeout=120 {FAST} output_dir={out}"
    run = flwr_run(fed, overrides)
    try:
        deadline = time.monotonic() + 150
        while not ((out / "metrics.csv").exists() and len(rows(out)) >= 2):
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        victim = _worker_pids(fed)["supernode-1"][0]
        os.kill(victim, signal.SIGKILL)
        log, _ = run.communicate(timeout=200)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, log
    table = rows(out)
    assert [int(r["round"]) for r in table] == [0, 1, 2, 3, 4]
    assert all(int(r["clients"]) == 2 and int(r["failed"]) == 0 for r in table[1:]), log
    assert victim not in _worker_pids(fed)["supernode-1"]  # a new worker took over
    _assert_same_model(load_file(out / "model.safetensors"),
                       _inline_model(overrides, out, flwr_env / "ref"))


def test_two_runs_get_their_own_workers_which_refuse_other_runs(federation, flwr_env):
    from fedrac.deploy.worker import _recv, _send, socket_path

    fed = federation(1)
    for i in (1, 2):
        out = flwr_env / f"out{i}"
        run = flwr_run(fed, f"num_rounds=1 num_clients=1 {FAST} output_dir={out}")
        log, _ = run.communicate(timeout=240)
        assert run.returncode == 0, log
    folder = fed.worker_dir("supernode-0")
    runs = sorted(int(p.stem.split("-")[1]) for p in folder.glob("run-*.pid"))
    assert len(runs) == 2 and len(_worker_pids(fed)["supernode-0"]) == 2
    # a message of another run is refused by a worker (one socket, the other run's id)
    run_a, run_b = runs
    import socket as sk

    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as conn:
        conn.connect(str(socket_path(folder, run_a)))
        _send(conn, json.dumps({"run_id": run_b, "node_id": 1, "task_id": 1,
                                "kind": "train"}).encode(), b"", b"")
        head, _, _ = _recv(conn, 3)
    status = json.loads(head)
    assert not status["ok"] and f"serves run {run_a}, not run {run_b}" in status["error"]


def _listen_addresses(port: int) -> set[str]:
    """The local addresses something LISTENs on ``port`` at (from /proc/net/tcp and tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.add(host)
    return out


def test_an_outsider_with_the_ca_cannot_register_a_key_or_start_a_run(federation, flwr_env):
    """The Fleet port serves only the Fleet API: `flwr` commands aimed at it with the CA
    certificate are refused (404); the Control API listens on 127.0.0.1 only."""
    import ssl
    import urllib.error
    import urllib.request

    fed = federation(1, auth=True)
    fleet_port = int(fed.address.rsplit(":", 1)[1])
    control_port = int(fed.control_address.rsplit(":", 1)[1])
    assert fleet_port != control_port
    assert _listen_addresses(control_port) == {"0100007F"}  # 127.0.0.1, nothing else
    config = Path(fed.flwr_home) / "config.toml"
    config.write_text(config.read_text() + f'\n[superlink.outsider]\naddress = "{fed.address}"'
                      f'\nroot-certificates = "{fed.root_cert}"\n')
    _, pub = make_node_keys(flwr_env / "keys", "intruder")
    res = flwr_cli(["supernode", "register", str(pub), "outsider"])
    assert res.returncode != 0 and "404" in res.stdout + res.stderr, res.stdout
    outsider = Federation(**{**fed.__dict__, "connection": "outsider"})
    run = flwr_run(outsider, f"num_rounds=1 num_clients=1 output_dir={flwr_env / 'never'}")
    log, _ = run.communicate(timeout=120)
    assert run.returncode != 0 and "404" in log, log
    # the raw request, too: the Control API's routes do not exist on the Fleet port
    ctx = ssl.create_default_context(cafile=fed.root_cert)
    req = urllib.request.Request(f"https://{fed.address}/v1/control/start-run", data=b"",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, context=ctx, timeout=20)
    assert err.value.code == 404
    # the operator's connection (the Control API on 127.0.0.1) still works, and the only
    # node is the one whose key `up` registered there
    assert len(online_nodes(fed.connection)) == 1
    nodes = json.loads(flwr_cli(["supernode", "list", fed.connection, "--format",
                                 "json"]).stdout)["nodes"]
    assert len(nodes) == 1


@pytest.mark.slow
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second local user")
def test_another_local_user_cannot_use_the_control_or_runtime_api(federation, flwr_env):
    """uid 65534 ("nobody") on the server machine: 403 from the Control API (list runs) and
    from a SuperNode's Runtime API (acquire a task); the operator's CLI still works."""
    fed = federation(1)
    control = int(fed.control_address.rsplit(":", 1)[1])
    runtime = next(iter(fed.node_ports.values()))
    probe = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
             " s.sendall(('POST ' + sys.argv[2] + ' HTTP/1.0\\r\\nContent-Length: 0\\r\\n\\r\\n')"
             ".encode()); print(s.recv(100).split(b'\\r\\n')[0].decode())")
    for port, path in ((control, "/v1/control/list-runs"),
                       (runtime, "/v1/runtime/acquire-task")):
        out = subprocess.run(["/usr/bin/python3", "-c", probe, str(port), path], cwd="/",
                             user=65534, group=65534, extra_groups=[], capture_output=True,
                             text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        assert out.stdout.strip() == "HTTP/1.1 403 Forbidden", (port, out.stdout, out.stderr)
    assert len(online_nodes(fed.connection)) == 1  # the operator's account gets through


@pytest.mark.slow
def test_deployment_resume_as_documented(federation, flwr_env):
    """``-c 'overrides="resume=DIR num_rounds=3"'`` continues a 2-round run: the nodes get the
    run's own overrides from the ServerApp (they cannot read DIR), and the run ends at 3."""
    fed = federation(2)
    out = flwr_env / "out"
    run = flwr_run(fed, f"strategy=rac_lora num_rounds=2 num_clients=2 {FAST} output_dir={out}")
    log, _ = run.communicate(timeout=240)
    assert run.returncode == 0, log
    run = flwr_run(fed, f"resume={out} num_rounds=3")
    log, _ = run.communicate(timeout=240)
    assert run.returncode == 0, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rounds"] == 3, log
    assert [int(r["round"]) for r in rows(out)] == [0, 1, 2, 3]
    assert all(int(r["clients"]) == 2 for r in rows(out)[1:]), log
