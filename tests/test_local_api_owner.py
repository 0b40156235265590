"""The local Flower APIs fedrac starts (SuperLink Control/ServerAppIo, a SuperNode's Runtime
API) answer only the operator's account: another local user (a uid made for the test) gets
403, with the server's own uid the request goes through."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from fedrac.deploy.peer import peer_uid, same_user_only

OTHER_UID = 65534  # "nobody": a second, unprivileged local account
GET = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
       "s.sendall(b'GET /v1/control/list-runs HTTP/1.0\\r\\n\\r\\n'); "
       "print(s.recv(100).split(b'\\r\\n')[0].decode())")


async def _ok(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"runs\n"})


@pytest.fixture
def guarded_port():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(same_user_only(_ok), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def _status(port: int, uid: int | None = None) -> str:
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else \
        shutil.which("python3")
    kwargs = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    out = subprocess.run([python, "-c", GET, str(port)], capture_output=True, text=True,
                         timeout=30, cwd="/", env={"PATH": os.environ.get("PATH", "")},
                         **kwargs)
    return out.stdout.strip() or out.stderr.strip()[-300:]


def test_peer_uid_names_the_owner_of_a_loopback_connection():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            assert peer_uid(client.getsockname(), server.getsockname()[1]) == os.getuid()
    assert peer_uid(("127.0.0.1", 1), 2) is None


def test_the_operator_gets_through(guarded_port):
    assert _status(guarded_port) == "HTTP/1.1 200 OK"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second local user")
def test_another_local_user_is_refused(guarded_port):
    assert _status(guarded_port, OTHER_UID) == "HTTP/1.1 403 Forbidden"


def test_fedracs_listeners_are_wrapped():
    """The SuperNode launcher wraps Flower's Runtime app; the SuperLink launcher its main
    listener (checked in its source: the app is served only through same_user_only)."""
    import inspect

    from fedrac.deploy import superlink, supernode

    supernode.guard_runtime_api()
    from flwr.supernode import main as node_main

    assert getattr(node_main.create_app, "fedrac_guarded", False)
    assert "uvicorn.Config(same_user_only(app" in inspect.getsource(superlink._serve)
