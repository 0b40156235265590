"""A node worker: keeps a SuperNode's heavy state (imports, config, data, model) warm
between the messages of one run.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message. When
the SuperNode's environment names a worker folder (``FEDRAC_WORKER_DIR``, set by
``python -m fedrac.deploy up``), fedrac's ClientApp in that process does not train itself:
it hands the message and the node's ``Context`` to the worker of this run, over a Unix
socket in that folder (folder 0700, socket 0600, peer uid checked), and returns the
worker's reply and context to Flower. Flower stays the transport, the security boundary
and the fault detector: messages, replies, node state, heartbeats and timeouts are all
Flower's; the worker only computes, with the same handlers the inline engine calls.

- One worker per run: socket ``run-<run_id>.sock`` (:func:`socket_path`); a worker refuses
  other runs' messages.
- Started on demand by the ClientApp process (the first message of a run pays the
  start-up once); a dead or missing worker is started again and the message is sent
  again (handlers are pure functions of message and context, so the result is the same).
- With ``strategy.download=delta`` the node's cached global weights stay in the worker
  (:func:`hold`); its ``Context`` carries a token instead, so a round's context is small.
  The model itself is built (its checkpoint loaded) once per worker.
- A worker exits when its SuperNode is gone, after ``FEDRAC_WORKER_IDLE`` seconds without
  a message (default 900), 60 s after its last message once it has served the run's last
  train round (``num_rounds``: the run is over), or on SIGTERM (``python -m fedrac.deploy
  down``).

Wire format: frames of an 8-byte big-endian length and bytes. Request: a JSON header
(``run_id``, ``node_id``, ``task_id``, ``kind``), Flower's protobuf of the ``Message`` and
of the ``Context``. Reply: a JSON header (``ok``, ``error``), the reply ``Message`` and
the ``Context``, as protobuf.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from fedrac.deploy.procs import pid_exists

WORKER_DIR_ENV = "FEDRAC_WORKER_DIR"
IDLE_ENV = "FEDRAC_WORKER_IDLE"
START_TIMEOUT = 300.0  # seconds a new worker may take to listen (imports, data)


class WorkerError(RuntimeError):
    """The worker could not be reached or refused the message; the text says why."""


# ------------------------------------------------------------------ wire


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(struct.pack(">Q", len(frame)) + frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, count: int) -> list[bytes]:
    return [_recv_exact(sock, struct.unpack(">Q", _recv_exact(sock, 8))[0])
            for _ in range(count)]


def _encode(message: Message, context: Context) -> tuple[bytes, bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    return (message_to_proto(message).SerializeToString(),
            context_to_proto(context).SerializeToString())


def _decode(message: bytes, context: bytes) -> tuple[Message, Context]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    pm, pc = ProtoMessage(), ProtoContext()
    pm.ParseFromString(message)
    pc.ParseFromString(context)
    return message_from_proto(pm), context_from_proto(pc)


def socket_path(folder: str | Path, run_id: int) -> Path:
    """The socket of run ``run_id``'s worker: in ``folder``, or, where that path is too long
    for a Unix socket (108 bytes), in a private ``fedrac-<uid>`` folder of the temp dir."""
    path = Path(folder) / f"run-{int(run_id)}.sock"
    if len(os.fsencode(str(path))) < 100:
        return path
    import hashlib
    import tempfile

    tag = hashlib.sha256(os.fsencode(str(Path(folder).resolve()))).hexdigest()[:16]
    short = private_folder(Path(tempfile.gettempdir()) / f"fedrac-{os.getuid()}")
    return short / f"{tag}-{int(run_id)}.sock"


def private_folder(folder: str | Path) -> Path:
    """``folder``, created if needed, owned by this user and readable by nobody else."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise WorkerError(f"worker folder {path} belongs to uid {info.st_uid}, not to this "
                          f"user ({os.getuid()}); refusing to use it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


# ------------------------------------------------------------------ ClientApp side


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _code_root() -> str:
    """The folder holding this fedrac (the FAB's install folder under ``flwr run``)."""
    import fedrac

    return str(Path(fedrac.__file__).resolve().parent.parent)


def start_worker(folder: Path, run_id: int, parent: int) -> subprocess.Popen:
    """Start run ``run_id``'s worker (this fedrac's code, this interpreter) in the background."""
    env = dict(os.environ)
    root = _code_root()
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    log = (folder / f"run-{int(run_id)}.log").open("ab")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedrac.deploy.worker", "--dir", str(folder),
             "--run-id", str(int(run_id)), "--parent", str(parent)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=root, start_new_session=True)


def _worker_socket(folder: Path, run_id: int, timeout: float = START_TIMEOUT) -> socket.socket:
    """A connection to run ``run_id``'s worker, starting it when none listens."""
    path = socket_path(folder, run_id)
    sock = _connect(path)
    if sock is not None:
        return sock
    with (folder / f"run-{int(run_id)}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per run and node
        sock = _connect(path)
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead worker's socket
        proc = start_worker(folder, run_id, os.getppid())
        deadline = time.monotonic() + timeout
        while (sock := _connect(path)) is None:
            if proc.poll() is not None:
                log = folder / f"run-{int(run_id)}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise WorkerError(f"the node worker for run {run_id} exited with code "
                                  f"{proc.returncode}; its log {log}:\n{tail}")
            if time.monotonic() > deadline:
                raise WorkerError(f"the node worker for run {run_id} did not listen on "
                                  f"{path} within {timeout:.0f} s")
            time.sleep(0.05)
        return sock


def call_worker(folder: str | Path, kind: str, message: Message, context: Context) -> Message:
    """Have this run's worker handle ``message`` (``kind``: train/evaluate); return its reply.

    ``context.state`` is replaced by the worker's (as if the handler had run here). A worker
    that dies before replying is started again and gets the message again, once.
    """
    from flwr.supercore.task_identity import TaskIdentity

    path = private_folder(folder)
    header = json.dumps({"run_id": int(context.run_id), "node_id": int(context.node_id),
                         "task_id": int(TaskIdentity.task_id), "kind": kind}).encode()
    frames = (header, *_encode(message, context))
    for attempt in (1, 2):
        sock = _worker_socket(path, context.run_id)
        try:
            with sock:
                _send(sock, *frames)
                head, reply_bytes, context_bytes = _recv(sock, 3)
            break
        except (ConnectionError, OSError):
            if attempt == 2:
                raise
    status = json.loads(head)
    if not status.get("ok"):
        raise WorkerError(str(status.get("error")))
    reply, new_context = _decode(reply_bytes, context_bytes)
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in new_context.state.items():
        context.state[key] = record
    return reply


# ------------------------------------------------------------------ worker side


def handle(kind: str, message: Message, context: Context) -> Message:
    """What fedrac's ClientApp does with the message, in this (warm) process."""
    from clients import handlers
    from fedrac.settings.deployment import node_config
    from fedrac.settings.typed import settings_of

    settings = settings_of(node_config(message, context))  # typed once per message
    if kind == "train":
        config = message.content.config_records.get("config") or {}
        if int(config.get("server-round", 0)) >= settings.run.num_rounds > 0:
            FINAL_ROUND_SERVED.set()  # the run's last round: leave soon after it
        return handlers.handle_train(settings, message, context)
    if kind == "evaluate":
        return handlers.handle_evaluate(settings, message, context)
    raise ValueError(f"kind={kind!r} is not allowed; allowed: train, evaluate")


FINAL_GRACE = 60.0  # s a worker stays after the run's last train message (its evaluation)
FINAL_ROUND_SERVED = threading.Event()
HELD_KEY = "fedrac.weights-held"  # Context.state: the token of the weights the worker holds
_held: dict[int, tuple[str, Any]] = {}  # node id -> (token, its cached global weights)


def hold(node_id: int, context: Context) -> None:
    """Keep the node's cached global weights (``download=delta``) in this worker and leave a
    token in their place: the context travels between processes with every message, the
    weights need not (a worker started again holds nothing: the node resyncs once)."""
    from fedrac.wire.delta_sync import STATE_WEIGHTS

    if STATE_WEIGHTS in context.state:
        token = uuid.uuid4().hex
        _held[node_id] = (token, context.state[STATE_WEIGHTS])
        del context.state[STATE_WEIGHTS]
        context.state[HELD_KEY] = ConfigRecord({"token": token})


def restore_held(node_id: int, context: Context) -> None:
    """Put back the weights :func:`hold` kept for the node, if the context's token is theirs."""
    from fedrac.wire.delta_sync import STATE_WEIGHTS

    if HELD_KEY not in context.state:
        return
    token = context.state[HELD_KEY].get("token")
    del context.state[HELD_KEY]
    held = _held.get(node_id)
    if held is not None and held[0] == token:
        context.state[STATE_WEIGHTS] = held[1]


def _serve_one(conn: socket.socket, run_id: int) -> None:
    from fedrac.engines.inline import _as_task

    uid = os.getuid()
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != uid:
        return  # another user's process: not served (the socket is 0600 anyway)
    head, message_bytes, context_bytes = _recv(conn, 3)
    try:
        req = json.loads(head)
        if int(req["run_id"]) != run_id:
            raise WorkerError(f"this worker serves run {run_id}, not run {req['run_id']}")
        message, context = _decode(message_bytes, context_bytes)
        if int(context.run_id) != run_id or int(message.metadata.run_id) != run_id:
            raise WorkerError(f"this worker serves run {run_id}, not run {context.run_id}")
        restore_held(int(req["node_id"]), context)
        with _as_task(run_id, int(req["node_id"]), int(req["task_id"])):
            reply = handle(str(req["kind"]), message, context)
        hold(int(req["node_id"]), context)
        _send(conn, json.dumps({"ok": True}).encode(), *_encode(reply, context))
    except Exception as err:  # noqa: BLE001 - every failure goes back as the ClientApp's
        _send(conn, json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}).encode(),
              b"", b"")


def serve(folder: str | Path, run_id: int, parent: int | None = None,
          idle: float | None = None, grace: float = FINAL_GRACE) -> None:
    """Serve run ``run_id``'s messages on its socket in ``folder`` until idle, orphaned or
    stopped; ``grace`` s after a message once the run's last train round was served."""
    import clients.handlers  # noqa: F401 - the heavy imports, before listening
    import fedrac.settings.deployment  # noqa: F401

    idle = float(os.environ.get(IDLE_ENV, 900)) if idle is None else idle
    path = private_folder(folder)
    sock_file = socket_path(path, run_id)
    pid_file = path / f"run-{int(run_id)}.pid"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with contextlib.suppress(FileNotFoundError):
            sock_file.unlink()
        server.bind(str(sock_file))  # 0600: only this user can connect
    finally:
        os.umask(old)
    server.listen(8)
    server.settimeout(1.0)
    pid_file.write_text(str(os.getpid()))
    last = [time.monotonic()]
    stop = threading.Event()

    def watch() -> None:  # leave when the SuperNode is gone or nothing came for `idle` s
        while not stop.wait(min(2.0, grace)):  # (FINAL_GRACE s once the last round was served)
            gone = parent is not None and not pid_exists(parent)
            limit = min(idle, grace) if FINAL_ROUND_SERVED.is_set() else idle
            if gone or time.monotonic() - last[0] > limit:
                stop.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    _serve_one(conn, run_id)
                except (ConnectionError, OSError) as err:
                    print(f"fedrac worker run {run_id}: connection failed: {err}", flush=True)
            last[0] = time.monotonic()
    finally:
        server.close()
        if sock_file.exists() and pid_file.exists() and pid_file.read_text() == str(os.getpid()):
            sock_file.unlink()
            pid_file.unlink()


def worker_pids(folder: str | Path) -> list[int]:
    """PIDs recorded by the workers in ``folder`` (for ``fedrac.deploy down``)."""
    pids = []
    for pid_file in Path(folder).glob("run-*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pid_file.read_text()))
    return pids


def main(argv: list[str] | None = None) -> None:
    """``python -m fedrac.deploy.worker --dir D --run-id R [--parent PID]`` (the ClientApp
    starts it; not meant to be run by hand)."""
    import signal

    parser = argparse.ArgumentParser(prog="python -m fedrac.deploy.worker")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--run-id", type=int, required=True)
    parser.add_argument("--parent", type=int, default=None)
    args = parser.parse_args(argv)

    def _stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    serve(args.dir, args.run_id, args.parent)


if __name__ == "__main__":
    main()
