"""A root-started deployment runs its nodes and apps as an unprivileged account
(:mod:`fedrac.deploy.runas`): checked with a second Unix user the tests create (and remove),
in the real processes' ``/proc/PID/status``; that account gets the Runtime API only, and
other local users none of the local APIs. Skipped when not root or without ``useradd``."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedrac.deploy import local, procs, runas
from fedrac.deploy.peer import same_user_only
from fedrac.deploy.runas import RunAsError
from fedrac.deploy.worker import worker_pids
from tests import unix_users
from tests.test_local_api_owner import _ok
from tests.unix_users import second_user

ROOT_ONLY = pytest.mark.skipif(not unix_users.CAN_MAKE_USERS,
                               reason="needs root and useradd to make a second Unix user")
OTHER_UID = 65534  # "nobody": a local account that is neither the operator nor the node user
REPO = Path(__file__).resolve().parents[1]
PROBE = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
         " s.sendall(('POST ' + sys.argv[2] + ' HTTP/1.0\\r\\nContent-Length: 0\\r\\n\\r\\n')"
         ".encode()); print(s.recv(100).split(b'\\r\\n')[0].decode())")


@pytest.fixture(scope="module")
def node_user():
    """A fresh system account (removed at the end, with its group)."""
    with second_user() as user:
        yield user


@pytest.fixture
def open_dir():
    """A folder every account can enter."""
    with unix_users.open_dir() as path:
        yield path


def ids(pid: int) -> tuple[list[int], list[int], str]:
    """Real/effective/saved/fs uids, gids and supplementary groups of ``pid``."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return ([int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()],
            fields["Groups"].strip())


def status_as(port: int, path: str, uid: int, gid: int) -> str:
    """The HTTP status line a POST to ``path`` on ``port`` gets from account ``uid``."""
    out = subprocess.run(["/usr/bin/python3", "-c", PROBE, str(port), path], cwd="/",
                         user=uid, group=gid, extra_groups=[], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin"})
    return out.stdout.strip() or out.stderr.strip()[-300:]


# --------------------------------------------------------------------------- not root / bad input


def test_not_root_changes_nothing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert runas.resolve("no-such-account-x9") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_missing_run_as_user_is_one_line_naming_the_option_and_useradd():
    with pytest.raises(RunAsError) as err:
        runas.resolve("no-such-account-x9")
    msg = str(err.value)
    assert "\n" not in msg and "'no-such-account-x9' does not exist" in msg
    assert "--create-user" in msg and "--run-as USER" in msg and "useradd --system" in msg
    with pytest.raises(RunAsError, match="uid or gid 0"):
        runas.resolve("root")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_cli_exits_2_before_starting_anything(tmp_path, capsys):
    from fedrac.deploy.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["up", "--nodes", "1", "--dir", str(tmp_path / "fed"), "--run-as",
              "no-such-account-x9"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedrac.deploy: error: run_as user 'no-such-account-x9'"), err
    assert not (tmp_path / "fed").exists()


def test_superexec_counts_another_accounts_parent_as_alive(monkeypatch):
    from fedrac.deploy import superexec

    def kill(pid, sig, error=None):
        if error:
            raise error
    monkeypatch.setattr(os, "kill", lambda pid, sig: kill(pid, sig, PermissionError()))
    assert superexec.pid_exists(1)
    monkeypatch.setattr(os, "kill", lambda pid, sig: kill(pid, sig, ProcessLookupError()))
    assert not superexec.pid_exists(1)


# --------------------------------------------------------------------------- with a second user


@ROOT_ONLY
def test_create_user_makes_a_system_account_without_login():
    name = f"fedrac-c{os.getpid() % 100000}"
    try:
        user = runas.resolve(name, create=True)
        entry = pwd.getpwnam(name)
        assert user is not None and (user.uid, user.gid) == (entry.pw_uid, entry.pw_gid)
        assert user.uid != 0 and entry.pw_shell == "/usr/sbin/nologin"
        assert runas.resolve(name) == user  # exists now: no --create-user needed
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@ROOT_ONLY
def test_an_unreachable_federation_folder_is_named(node_user, tmp_path):
    """pytest's tmp folders are 0700: `up` says so in one line before starting anything."""
    with pytest.raises(RunAsError) as err:
        local.up(tmp_path / "fed", 1, run_as=node_user.name)
    assert str(err.value).startswith(f"{tmp_path / 'fed'} is not readable by user "
                                     f"{node_user.name}: chown/chmod it")
    assert not (tmp_path / "fed" / local.STATE_FILE).exists()


@ROOT_ONLY
def test_a_supernode_starts_as_the_run_as_user(node_user, open_dir, monkeypatch):
    """start_node: the process's real, effective, saved uid and gid are the node user's, no
    supplementary groups; its worker folder and key belong to that user, HOME is its own."""
    monkeypatch.setattr(local, "supernode_command", lambda *a, **k: ["/bin/sleep", "60"])
    key = open_dir / "keys" / "node"
    key.parent.mkdir()
    key.write_text("private")
    key.chmod(0o600)
    fed = local.Federation(dir=str(open_dir), connection="c", address="127.0.0.1:1",
                           superlink_pid=0, run_as=node_user.name)
    pid = local.start_node(fed, "supernode-0", {"partition-id": 0}, private_key=key)
    try:
        uids, gids, groups = ids(pid)
        assert uids == [node_user.uid] * 4 and gids == [node_user.gid] * 4 and groups == ""
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"HOME={fed.home}".encode() in env and f"FLWR_HOME={fed.home}".encode() in env
        folder = fed.worker_dir("supernode-0").stat()
        assert (folder.st_uid, folder.st_mode & 0o777) == (node_user.uid, 0o700)
        assert key.stat().st_uid == node_user.uid and key.stat().st_mode & 0o777 == 0o600
    finally:
        procs.stop([pid], grace=2)


@ROOT_ONLY
def test_serverapps_start_as_the_run_as_user(node_user, monkeypatch, tmp_path):
    """The SuperLink launcher's SuperExec command runs as the node user (setpriv)."""
    import importlib

    from fedrac.deploy import superlink

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    monkeypatch.setattr(fs, "_get_superexec_command", fs._get_superexec_command)
    superlink.drop_serverapps(node_user.uid, node_user.gid, str(tmp_path))
    argv = fs._get_superexec_command(
        runtime_address="127.0.0.1:1", runtime_certificates=None,
        runtime_root_certificates_path=None, parent_pid=1, runtime_dependency_install=False)
    assert argv[argv.index(sys.executable):][1:3] == ["-m", "fedrac.deploy.superexec"]
    assert "--parent-pid" in argv and f"FLWR_HOME={tmp_path}" in argv
    prefix = argv[:argv.index(sys.executable)]
    for flag, want in (("-u", node_user.uid), ("-G", node_user.gid)):
        out = subprocess.run([*prefix, "/usr/bin/id", flag], capture_output=True, text=True,
                             check=True, cwd="/")
        assert out.stdout.split() == [str(want)], (flag, out.stdout)


@ROOT_ONLY
def test_the_node_user_gets_the_runtime_api_only_others_nothing(node_user):
    """The SuperLink's main listener as a root-started `up` wraps it: the node user reaches
    /v1/runtime/ (its ServerApp) but not the Control API; another account reaches neither."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = same_user_only(_ok, limited={node_user.uid: ("/v1/runtime/",)})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        me = (node_user.uid, node_user.gid)
        assert status_as(port, "/v1/runtime/pull-task-input", *me) == "HTTP/1.1 200 OK"
        assert status_as(port, "/v1/control/list-runs", *me) == "HTTP/1.1 403 Forbidden"
        assert status_as(port, "/v1/runtime/../control/list-runs", *me) == \
            "HTTP/1.1 403 Forbidden"
        for path in ("/v1/runtime/pull-task-input", "/v1/control/list-runs"):
            assert status_as(port, path, OTHER_UID, OTHER_UID) == "HTTP/1.1 403 Forbidden"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@ROOT_ONLY
def test_root_started_deployment_runs_nodes_and_apps_as_the_node_user(node_user, open_dir,
                                                                      monkeypatch):
    """`up` as root, then a 2-round `flwr run`: every SuperNode, SuperExec, ServerApp,
    ClientApp and node worker runs as the node user (never uid 0), the run completes, and
    neither that user nor "nobody" can use the Control API or a node's Runtime API."""
    if not node_user.can_reach(sys.executable):
        pytest.skip(f"{sys.executable} is not runnable by a second user (its Python lies "
                    f"under a 0700 folder, e.g. /root): install Python where others can run it")
    home = open_dir / "operator"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("FLWR_HOME", str(home / "flwr"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FEDRAC_CACHE", str(node_user.own(open_dir / "cache", 0o755)))
    fed = local.up(open_dir / "fed", 2, run_as=node_user.name)
    seen: set[tuple[int, int, str]] = set()  # (pid, real uid, command line) samples
    try:
        out = Path(fed.dir) / "results" / "r1"
        run = subprocess.Popen(
            [local.flwr_exe("flwr"), "run", str(REPO), fed.connection, "--stream", "-c",
             "overrides=" + json.dumps(f"num_rounds=2 num_clients=2 client.local_steps=2 "
                                       f"seed=3 output_dir={out}")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=local.process_env())
        while run.poll() is None:  # sample the process tree while the run goes on
            pids = procs.descendants(fed.superlink_pid)
            for name, top in fed.node_pids.items():
                pids += [top, *procs.descendants(top), *worker_pids(fed.worker_dir(name))]
            for pid in pids:
                try:
                    seen.add((pid, ids(pid)[0][0], Path(f"/proc/{pid}/cmdline")
                              .read_bytes().replace(b"\0", b" ").decode()[:120]))
                except (OSError, KeyError):
                    pass
            time.sleep(0.02)  # a ClientApp process may live for a fraction of a second
        log = run.stdout.read()
        assert run.returncode == 0, log
        assert json.loads((out / "summary.json").read_text())["status"] == "ok", log
        kinds = {k for _, _, cmd in seen for k in
                 ("supernode", "superexec", "flwr-serverapp", "flwr-clientapp", "worker")
                 if k in cmd}
        assert kinds == {"supernode", "superexec", "flwr-serverapp", "flwr-clientapp",
                         "worker"}, seen
        assert {uid for _, uid, _ in seen} == {node_user.uid}, seen
        assert ids(fed.superlink_pid)[0][0] == 0  # the operator's: it holds server.key
        control = int(fed.control_address.rsplit(":", 1)[1])
        runtime = next(iter(fed.node_ports.values()))
        me = (node_user.uid, node_user.gid)
        assert status_as(control, "/v1/control/list-runs", *me) == "HTTP/1.1 403 Forbidden"
        for port, path in ((control, "/v1/control/list-runs"),
                           (runtime, "/v1/runtime/acquire-task")):
            assert status_as(port, path, OTHER_UID, OTHER_UID) == "HTTP/1.1 403 Forbidden"
        assert len(local.online_nodes(fed.connection)) == 2  # the operator still gets in
    finally:
        local.down(fed.dir)
