"""A local federation on one machine: a SuperLink and N SuperNodes, started and stopped by PID.

``up`` writes ``<dir>/federation.json`` (PIDs, ports, files), logs to ``<dir>/logs/`` and
a SuperLink connection into Flower's config (``$FLWR_HOME/config.toml``; it never changes
the ``default`` connection); ``down`` stops exactly the recorded processes and their
children. The SuperLink is :mod:`fedrac.deploy.superlink`: its Control API (what the
connection names) listens on ``control_host`` (127.0.0.1), apart from the Fleet API the
SuperNodes reach.

Started by root, ``up`` runs the SuperNodes, the apps Flower starts (ClientApp, ServerApp)
and the node workers as an unprivileged account (``run_as``, default ``fedrac``;
:mod:`fedrac.deploy.runas`) with ``HOME`` and ``FLWR_HOME`` in ``<dir>/home``; the SuperLink
stays with the operator: it holds ``server.key`` and the Control API.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli
import tomli_w

from fedrac.deploy import procs
from fedrac.deploy.certs import make_certificates, make_node_keys
from fedrac.deploy.runas import DEFAULT_USER, RunAs, RunAsError, resolve

STATE_FILE = "federation.json"
DEFAULT_CONNECTION = "fedrac-local"


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


def bin_dir() -> Path:
    """The folder with this interpreter's console scripts (flwr, flower-superlink, ...)."""
    return Path(sys.executable).parent


def flwr_exe(name: str) -> str:
    """Full path of Flower's console script ``name`` next to this interpreter, else ``name``."""
    path = bin_dir() / name
    return str(path) if path.exists() else name


def process_env(threads: int | None = None, extra: Mapping[str, str] | None = None) -> dict:
    """Environment for Flower processes: console scripts on PATH, no runtime pip installs."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.update(extra or {})
    return env


def superlink_command(host: str, port: int, certs: Mapping[str, Any] | None = None,
                      auth: bool = False, control_host: str = "127.0.0.1",
                      control_port: int | None = None, run_as: RunAs | None = None,
                      run_as_home: str | Path = "") -> list[str]:
    """SuperLink argv (:mod:`fedrac.deploy.superlink`): the Fleet API on ``host:port``, the
    Control API on ``control_host:control_port``; TLS with ``certs`` (else --insecure),
    optional node auth; its ServerApps as ``run_as`` (home ``run_as_home``)."""
    argv = [sys.executable, "-m", "fedrac.deploy.superlink", "--fleet-host", host,
            "--fleet-port", str(port), "--host", control_host,
            "--port", str(control_port or procs.free_port(control_host)),
            "--disable-runtime-dependency-installation"]
    if certs:
        argv += ["--ssl-ca-certfile", str(certs["ca_cert"]),
                 "--ssl-certfile", str(certs["server_cert"]),
                 "--ssl-keyfile", str(certs["server_key"])]
    else:
        argv.append("--insecure")
    if auth:
        argv.append("--enable-supernode-auth")
    if run_as:
        argv += ["--run-as-uid", str(run_as.uid), "--run-as-gid", str(run_as.gid),
                 "--run-as-home", str(run_as_home)]
    return argv


def node_config_string(node_config: Mapping[str, Any]) -> str:
    """``{'partition-id': 0, 'data-path': '/srv/a'}`` -> ``partition-id=0 data-path="/srv/a"``."""
    parts = []
    for key, value in node_config.items():
        parts.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return " ".join(parts)


def supernode_command(superlink: str, port: int, node_config: Mapping[str, Any],
                      root_cert: str | Path | None = None,
                      private_key: str | Path | None = None,
                      poll: float | None = None) -> list[str]:
    """``flower-supernode`` argv (through :mod:`fedrac.deploy.supernode`: its local Runtime
    API only for the operator's account): TLS when ``root_cert`` is given, auth with
    ``private_key``; idle polls of ``poll`` s (``None``: Flower's fixed 3 s)."""
    start = [sys.executable, "-m", "fedrac.deploy.supernode", "--poll", str(poll or 3)]
    argv = [*start, "--superlink", superlink, "--port", str(port),
            "--node-config", node_config_string(node_config)]
    argv += ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    if private_key:
        argv += ["--auth-supernode-private-key", str(private_key)]
    return argv


def flwr_home() -> Path:
    """Flower's config folder: ``$FLWR_HOME`` or ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(name: str, address: str, root_cert: str | Path | None = None,
                     make_default: bool = False) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in Flower's ``config.toml``; keep other entries
    and the ``default`` connection (unless ``make_default``)."""
    path = flwr_home() / "config.toml"
    data: dict[str, Any] = tomli.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_cert:
        entry["root-certificates"] = str(Path(root_cert).resolve())
    else:
        entry["insecure"] = True
    links[name] = entry
    if make_default:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def flwr_cli(args: Sequence[str], env: Mapping[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``args``; output captured as text."""
    return subprocess.run([flwr_exe("flwr"), *args], capture_output=True, text=True,
                          env=dict(env or process_env()), timeout=timeout)


def online_nodes(connection: str, env: Mapping[str, str] | None = None) -> list[int]:
    """Ids of the SuperNodes the SuperLink behind ``connection`` lists as online."""
    res = flwr_cli(["supernode", "list", connection, "--format", "json"], env)
    try:
        nodes = json.loads(res.stdout).get("nodes", [])
    except json.JSONDecodeError:
        return []
    return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]


def register_node(public_key: str | Path, connection: str,
                  env: Mapping[str, str] | None = None) -> None:
    """Register a SuperNode public key with the SuperLink (``flwr supernode register``)."""
    res = flwr_cli(["supernode", "register", str(public_key), connection], env)
    if res.returncode != 0:
        raise DeployError(f"flwr supernode register {public_key} failed: "
                          f"{(res.stdout + res.stderr).strip()[-500:]}")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' when missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Federation:
    """What ``up`` started: addresses, files and PIDs (saved as ``federation.json``).

    ``address``: the Fleet API (SuperNodes); ``control_address``: the Control API (the
    ``flwr`` CLI's connection).
    """

    dir: str
    connection: str
    address: str
    superlink_pid: int
    control_address: str = ""
    node_pids: dict[str, int] = field(default_factory=dict)
    node_ports: dict[str, int] = field(default_factory=dict)
    node_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    root_cert: str | None = None
    node_keys: dict[str, str] = field(default_factory=dict)
    flwr_home: str = ""
    workers: bool = True  # each SuperNode hands its messages to warm node workers
    poll: float | None = None  # SuperNode idle polls (s); None: Flower's fixed 3 s
    run_as: str | None = None  # the account nodes and apps run as (root-started `up`)

    def save(self) -> Path:
        path = Path(self.dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Federation:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise DeployError(f"no federation recorded in {path}; start one with "
                              "`python -m fedrac.deploy up`")
        return cls(**json.loads(path.read_text()))

    @property
    def pids(self) -> list[int]:
        return [self.superlink_pid, *self.node_pids.values()]

    def log(self, name: str) -> Path:
        return Path(self.dir) / "logs" / f"{name}.log"

    @property
    def home(self) -> Path:
        """``HOME`` and ``FLWR_HOME`` of the nodes and apps when they run as ``run_as``."""
        return Path(self.dir) / "home"

    def worker_dir(self, name: str) -> Path:
        """Node ``name``'s worker folder (sockets, PIDs, logs of its warm workers)."""
        return Path(self.dir) / "workers" / name

    def run_line(self, app: str = ".", overrides: str = "") -> str:
        """The ``flwr run`` command for this federation."""
        ov = overrides or (f"num_clients={len(self.node_pids)} "
                           f"output_dir={Path(self.dir).resolve() / 'results'}")
        run_cfg = f"{OVERRIDES_KEY}={json.dumps(ov)}"
        return f"flwr run {app} {self.connection} --stream -c {shlex.quote(run_cfg)}"


OVERRIDES_KEY = "overrides"


def start_node(fed: Federation, name: str, node_config: Mapping[str, Any],
               private_key: str | Path | None = None, threads: int | None = 1) -> int:
    """Start one SuperNode of ``fed`` (also to bring a stopped one back); record its PID."""
    port = fed.node_ports.get(name) or procs.free_port()
    argv = supernode_command(fed.address, port, node_config, fed.root_cert, private_key,
                             fed.poll)
    extra: dict[str, str] = {}
    user = resolve(fed.run_as) if fed.run_as else None
    if user:
        extra.update(HOME=str(fed.home), FLWR_HOME=str(fed.home))
        if private_key:
            os.chown(private_key, user.uid, user.gid)  # stays 0600: the node's own key
    if fed.workers:
        from fedrac.deploy.worker import WORKER_DIR_ENV, private_folder

        folder = user.own(fed.worker_dir(name)) if user else private_folder(
            fed.worker_dir(name))
        extra[WORKER_DIR_ENV] = str(folder)
    proc = procs.spawn(argv, fed.log(name), process_env(threads, extra),
                       user.popen_kwargs() if user else None)
    fed.node_pids[name], fed.node_ports[name] = proc.pid, port
    fed.node_configs[name] = dict(node_config)
    if private_key:
        fed.node_keys[name] = str(private_key)
    fed.save()
    return proc.pid


def wait_for(check, timeout: float, what: str, fed: Federation, log_name: str) -> None:
    """Poll ``check()`` until true; DeployError naming ``what`` and the log after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DeployError(f"{what} within {timeout:.0f} s; see {fed.log(log_name)}:\n"
                              f"{log_tail(fed.log(log_name))}")
        time.sleep(0.5)


def up(
    directory: str | Path, nodes: int = 2, *, tls: bool = False, auth: bool = False,
    host: str = "127.0.0.1", port: int | None = None, connection: str = DEFAULT_CONNECTION,
    data_paths: Sequence[str] = (), threads: int | None = 1, timeout: float = 90,
    workers: bool = True, poll: float | None = 0.1,
    control_host: str = "127.0.0.1", control_port: int | None = None,
    run_as: str | None = DEFAULT_USER, create_user: bool = False,
) -> Federation:
    """Start a SuperLink and ``nodes`` SuperNodes (node i: ``partition-id=i``, or its data path).

    The SuperNodes reach the Fleet API on ``host:port``; the Control API (the ``flwr`` CLI:
    runs, node keys) listens on ``control_host:control_port`` only. ``auth`` implies ``tls``
    (Flower requires TLS for SuperNode authentication). ``workers``: each SuperNode hands its
    messages to a warm fedrac node worker per run (:mod:`fedrac.deploy.worker`), started on
    the run's first message. ``poll``: the SuperNodes' idle polling interval
    (:mod:`fedrac.deploy.supernode`; ``None``: Flower's fixed 3 s). Started by root: nodes,
    apps and workers run as ``run_as`` (created first only with ``create_user``; RunAsError
    when missing, or when it cannot reach ``directory``, a data path or ``$FEDRAC_CACHE``;
    ``None``: they keep the caller's account -- tests of the federation itself).
    Waits until every node is online; on failure stops what it started and raises
    DeployError.
    """
    out = Path(directory).resolve()
    if (out / STATE_FILE).exists():
        old = Federation.load(out)
        if any(procs.alive(p) for p in old.pids):
            raise DeployError(f"a federation is already running from {out}; "
                              f"stop it first: python -m fedrac.deploy down --dir {out}")
    if nodes < 1:
        raise DeployError(f"nodes={nodes} is not allowed; allowed: an integer >= 1")
    if data_paths and len(data_paths) != nodes:
        raise DeployError(f"data paths={list(data_paths)} must name one folder per node "
                          f"({nodes} nodes)")
    tls = tls or auth
    user = resolve(run_as, create_user)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if user:
        check_reach(user, out, data_paths)
    certs = make_certificates(out / "certs", [host, control_host]) if tls else None
    port = port or procs.free_port(host)
    control_port = control_port or procs.free_port(control_host)
    fed = Federation(dir=str(out), connection=connection, address=f"{host}:{port}",
                     control_address=f"{control_host}:{control_port}",
                     superlink_pid=0, root_cert=str(certs["ca_cert"]) if certs else None,
                     flwr_home=str(flwr_home()), workers=workers, poll=poll,
                     run_as=user.name if user else None)
    env = process_env(threads)
    if user:
        user.own(fed.home)
        user.own(out / "results", 0o750)  # the ServerApp's default output_dir
    try:
        argv = superlink_command(host, port, certs, auth, control_host, control_port, user,
                                 fed.home)
        sl = procs.spawn(argv, fed.log("superlink"), env)
        fed.superlink_pid = sl.pid
        fed.save()
        wait_for(lambda: procs.port_open(host, port) and procs.port_open(
            control_host, control_port), timeout, "the SuperLink did not listen", fed,
            "superlink")
        write_connection(connection, fed.control_address, fed.root_cert)
        for i in range(nodes):
            name = f"supernode-{i}"
            cfg: dict[str, Any] = ({"data-path": data_paths[i]} if data_paths else
                                   {"partition-id": i, "num-partitions": nodes})
            key = None
            if auth:
                key, pub = make_node_keys(out / "keys", name)
                register_node(pub, connection, env)
            start_node(fed, name, cfg, key, threads)
        wait_for(lambda: len(online_nodes(connection, env)) >= nodes, timeout,
                 f"{nodes} SuperNodes did not come online", fed, "supernode-0")
    except BaseException:
        down(out)
        raise
    return fed


def check_reach(user: RunAs, out: Path, data_paths: Sequence[str] = ()) -> None:
    """RunAsError (one line) unless ``user`` can enter ``out``, run this interpreter, read
    each data path and write ``$FEDRAC_CACHE`` (when set)."""
    user.require(out)
    user.require(sys.executable)
    if not shutil.which("setpriv"):
        raise RunAsError(f"setpriv (util-linux) is not on PATH: needed to start the "
                         f"ServerApps as user {user.name}; install util-linux")
    for path in data_paths:
        user.require(Path(path).resolve())
    if os.environ.get("FEDRAC_CACHE"):
        cache = Path(os.environ["FEDRAC_CACHE"]).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        user.require(cache, write=True)


def down(directory: str | Path) -> list[int]:
    """Stop the recorded SuperLink, SuperNodes (and their children) and node workers; return
    those PIDs."""
    from fedrac.deploy.worker import worker_pids

    fed = Federation.load(directory)
    stopped = procs.stop(fed.pids)
    stopped += procs.stop([pid for name in fed.node_pids
                           for pid in worker_pids(fed.worker_dir(name))])
    (Path(fed.dir) / STATE_FILE).unlink(missing_ok=True)
    return stopped
