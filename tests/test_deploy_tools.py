"""Fast checks of the deployment pieces that need no Flower processes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tomli
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, RecordDict
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from clients.handlers import client_data, node_stream
from fedrac.data import DataConfigError, load_dataset_from_path
from fedrac.deploy import procs
from fedrac.deploy.certs import make_certificates, make_node_keys
from fedrac.deploy.local import node_config_string, write_connection
from fedrac.flower_apps import deployment_config
from fedrac.settings.config import ConfigError
from tests.helpers import settings_with


def test_flwr_run_overrides_compose_the_cli_config():
    cfg = deployment_config({"overrides": "strategy=fedavg num_rounds=4 output_dir=/srv/run"})
    assert cfg["strategy"]["name"] == "fedavg" and cfg["num_rounds"] == 4
    assert cfg["engine"]["name"] == "deployment" and cfg["output_dir"] == "/srv/run"


def test_flwr_run_without_output_dir_leaves_it_to_the_server_app():
    # the ServerApp writes to ~/fedrac-runs/run-<run id> (fedrac.flower_apps.default_output_dir)
    assert deployment_config({"overrides": "num_rounds=2"})["output_dir"] is None


@pytest.mark.parametrize("overrides, key", [
    ("output_dir=relative/out", "output_dir"),
    ("strategy=nope output_dir=/srv/x", "strategy"),
    ("num_rounds=0 output_dir=/srv/x", "num_rounds"),
])
def test_flwr_run_bad_overrides_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        deployment_config({"overrides": overrides})


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_data_path_node_reads_its_own_npz(tmp_path):
    x = np.random.default_rng(0).random((12, 64)).astype(np.float32)
    y = np.arange(12) % 5
    np.savez(tmp_path / "train.npz", x=x, y=y)
    ds = load_dataset_from_path(str(tmp_path), {"name": "digits"})
    assert ds.column_names == ["x", "label"] and len(ds) == 12
    settings = settings_with(dataset={"name": "digits"})
    ctx = _context({"data-path": str(tmp_path)})
    xt, yt = client_data(settings, ctx)
    np.testing.assert_allclose(xt.numpy(), x)
    assert yt.tolist() == y.tolist()
    assert node_stream(ctx) == node_stream(_context({"data-path": str(tmp_path)}))


def test_missing_data_path_fails_with_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataConfigError, match="data-path='.*nowhere'"):
        client_data(settings_with(dataset={"name": "digits"}),
                    _context({"data-path": str(missing)}))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataConfigError, match="bad.npz"):
        load_dataset_from_path(str(tmp_path / "bad.npz"), {"name": "digits"})


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path):
    paths = make_certificates(tmp_path, ["10.0.0.5", "link.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    assert {"10.0.0.5", "127.0.0.1"} <= names
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    assert oct(paths["server_key"].stat().st_mode & 0o777) == "0o600"


def test_node_keys_load_as_flower_expects(tmp_path):
    private, public = make_node_keys(tmp_path, "site0")
    assert load_ssh_private_key(private.read_bytes(), password=None) is not None
    assert try_load_public_key(public)  # what `flwr supernode register` accepts


def test_node_config_string_round_trips_through_flower_parser():
    cfg = {"partition-id": 0, "num-partitions": 3, "data-path": "/srv/site 0"}
    assert parse_config_args([node_config_string(cfg)]) == cfg


def test_write_connection_keeps_other_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "h:1"\ninsecure = true\n')
    write_connection("fedrac-local", "127.0.0.1:9", root_cert=tmp_path / "ca.crt")
    data = tomli.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["default"] == "mine"
    assert data["superlink"]["mine"]["address"] == "h:1"
    assert data["superlink"]["fedrac-local"] == {
        "address": "127.0.0.1:9", "root-certificates": str((tmp_path / "ca.crt").resolve())}


def test_stop_ends_the_process_and_its_children(tmp_path):
    proc = procs.spawn(["sh", "-c", "sleep 60 & sleep 60 & wait"], tmp_path / "p.log", {})
    deadline = time.monotonic() + 10
    while len(procs.descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = [proc.pid, *procs.descendants(proc.pid)]
    assert len(tree) == 3
    assert set(procs.stop([proc.pid], grace=5)) == set(tree)
    assert not any(procs.alive(p) for p in tree)


def test_private_keys_are_0600_from_their_first_byte(tmp_path, monkeypatch):
    """Every file is written through a descriptor: record its mode when data goes in."""
    import os
    import re

    from fedrac.deploy import certs as certs_module

    modes: dict[str, int] = {}
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        real_write = f.write

        def write(data):
            modes[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_mode & 0o777
            return real_write(data)

        f.write = write
        return f

    monkeypatch.setattr(certs_module.os, "fdopen", fdopen)
    (tmp_path / "keys").mkdir()
    old = tmp_path / "keys" / "site0"
    old.write_text("old key")
    old.chmod(0o644)  # an earlier, world-readable file of that name
    paths = make_certificates(tmp_path / "certs")
    private, public = make_node_keys(tmp_path / "keys", "site0")
    for path in (paths["ca_key"], paths["server_key"], private):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
        temp = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+")
        at_write = [m for k, m in modes.items() if temp.fullmatch(os.path.basename(k))]
        assert at_write == [0o600], (path, modes)
    assert oct(paths["ca_cert"].stat().st_mode & 0o777) == "0o644"
    assert oct(public.stat().st_mode & 0o777) == "0o644"
    assert private.read_bytes() != b"old key"


def test_write_connection_never_sets_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_connection("fedrac-local", "127.0.0.1:9")
    data = tomli.loads((tmp_path / "config.toml").read_text())
    assert "default" not in data["superlink"]
    assert data["superlink"]["fedrac-local"] == {"address": "127.0.0.1:9", "insecure": True}


def test_superlink_command_keeps_the_control_api_on_localhost():
    from fedrac.deploy.local import superlink_command

    argv = superlink_command("10.0.0.5", 9092, auth=True, control_port=9093)
    assert argv[1:3] == ["-m", "fedrac.deploy.superlink"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--fleet-host"] == "10.0.0.5" and flags["--fleet-port"] == "9092"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "9093"
    assert "--enable-supernode-auth" in argv and "0.0.0.0" not in argv


def test_the_fleet_listener_serves_only_the_fleet_routes():
    import asyncio

    from fedrac.deploy.superlink import fleet_only, fleet_paths

    paths = fleet_paths()
    assert "/v1/fleet/register-node" in paths and "/v1/fleet/pull-messages" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)
    served: list[str] = []

    async def app(scope, receive, send):
        served.append(scope["path"])

    def call(path: str, kind: str = "http") -> list[dict]:
        sent: list[dict] = []

        async def send(event):
            sent.append(event)

        asyncio.run(fleet_only(app)({"type": kind, "path": path}, None, send))
        return sent

    for path in ("/v1/control/start-run", "/v1/control/register-node",
                 "/v1/runtime/acquire-task", "/v1/fleet/../control/start-run", "/docs",
                 "/v1/fleet/register-node/", "/V1/FLEET/REGISTER-NODE"):
        sent = call(path)
        assert sent[0]["status"] == 404, path
    assert call("/v1/fleet/register-node") == [] and served == ["/v1/fleet/register-node"]
    assert call("/v1/fleet/pull-messages", "websocket")[0]["type"] == "websocket.close"


def test_a_worker_leaves_soon_after_the_runs_last_round(tmp_path):
    """After the last train round a worker waits ``grace`` s for more messages (the round's
    evaluation), not the 900 s idle limit (issue 20: idle workers left behind)."""
    import threading
    import time

    from fedrac.deploy import worker

    done = threading.Event()
    worker.FINAL_ROUND_SERVED.set()
    try:
        t = threading.Thread(target=lambda: (worker.serve(tmp_path / "w", 7, idle=900,
                                                          grace=0.5), done.set()), daemon=True)
        start = time.monotonic()
        t.start()
        assert done.wait(20), "the worker stayed for the idle limit"
        assert time.monotonic() - start < 10
    finally:
        worker.FINAL_ROUND_SERVED.clear()
