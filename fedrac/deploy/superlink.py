"""A Flower SuperLink whose Control API is not where SuperNodes connect.

``python -m fedrac.deploy superlink --fleet-host IP --fleet-port 9092 [flower-superlink flags]``

Flower 1.41's ``flower-superlink`` serves the Fleet API (SuperNodes), the Control API (the
``flwr`` CLI: start and stop runs, register SuperNode keys) and the ServerApp's runtime API on
one ``--host:--port``, and the open-source Control API authenticates nobody: whoever reaches
that port -- TLS only needs the public ``ca.crt`` -- can register their own node key or start
a run, which ships code to every node. (Its ``--fleet-api-address`` / ``--control-api-address``
flags are deprecated and no longer separate them.)

This launcher runs Flower's own SuperLink app (the same state, TLS and node authentication)
on two listeners:

- ``--host`` / ``--port`` (default ``127.0.0.1:9093``): every API, for the operator's ``flwr``
  CLI and the ServerApp on this machine, answered only to connections owned by the operator's
  uid (or root): another local account gets 403 (:mod:`fedrac.deploy.peer`);
- ``--fleet-host`` / ``--fleet-port`` (default ``127.0.0.1:9092``): only the Fleet API's routes
  (``/v1/fleet/...``), for the SuperNodes; anything else is answered 404.

Every other ``flower-superlink`` flag is passed through unchanged.

``--run-as-uid U --run-as-gid G --run-as-home H`` (what ``deploy up`` passes when started by
root): the SuperLink stays with the operator (it holds ``server.key`` and serves the Control
API), but the SuperExec it starts for ServerApps -- and so every ServerApp -- runs as uid U
(util-linux ``setpriv``) with ``HOME`` and ``FLWR_HOME`` = H, and uid U may use the Runtime
API's routes (``/v1/runtime/...``) on the main listener, never the Control API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]
DEFAULT_CONTROL_PORT, DEFAULT_FLEET_PORT = 9093, 9092


def fleet_paths() -> frozenset[str]:
    """The exact paths of Flower's Fleet API routes (what a SuperNode calls)."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset(route.path for route in router.routes)


def fleet_only(app: ASGIApp, allowed: frozenset[str] | None = None) -> ASGIApp:
    """``app`` restricted to the Fleet API: other HTTP paths get 404, websockets are closed."""
    paths = fleet_paths() if allowed is None else allowed

    async def guarded(scope: Scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path") in paths:
            await app(scope, receive, send)
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"not found\n"})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:  # lifespan: the main listener owns it
            await app(scope, receive, send)

    return guarded


def _split(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m fedrac.deploy superlink", add_help=False)
    p.add_argument("--fleet-host", default="127.0.0.1",
                   help="interface the SuperNodes reach (default 127.0.0.1)")
    p.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT)
    p.add_argument("--run-as-uid", type=int, default=None)
    p.add_argument("--run-as-gid", type=int, default=None)
    p.add_argument("--run-as-home", default=None)
    p.add_argument("-h", "--help", action="store_true")
    ours, rest = p.parse_known_args(list(argv))
    if not any(a == "--host" or a.startswith("--host=") for a in rest):
        rest = ["--host", "127.0.0.1", *rest]
    if not any(a == "--port" or a.startswith("--port=") for a in rest):
        rest = ["--port", str(DEFAULT_CONTROL_PORT), *rest]
    if ours.help:
        print(__doc__)
        rest = ["--help"]
    return ours, rest


class _FleetServer(uvicorn.Server):
    """The Fleet listener: signals are the main listener's to handle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


RUNTIME_PREFIX = "/v1/runtime/"


def drop_serverapps(uid: int, gid: int, home: str) -> None:
    """Start the SuperLink's SuperExec (hence its ServerApps) as ``uid``/``gid`` through
    ``setpriv``, with ``HOME`` and ``FLWR_HOME`` = ``home``."""
    import importlib

    from fedrac.deploy.runas import RunAs

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    build = fs._get_superexec_command
    if getattr(build, "fedrac_dropped", False):
        return

    def command(*args, **kwargs) -> list[str]:
        argv = build(*args, **kwargs)  # ["flower-superexec", flags...]
        return [*RunAs("", uid, gid).setpriv(), "env", f"HOME={home}", f"FLWR_HOME={home}",
                sys.executable, "-m", "fedrac.deploy.superexec", *argv[1:]]

    command.fedrac_dropped = True  # type: ignore[attr-defined]
    fs._get_superexec_command = command


async def _serve(app, config, fleet_host: str, fleet_port: int,
                 run_as_uid: int | None = None) -> None:
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    logs = get_uvicorn_log_config(console_handler.level)
    from fedrac.deploy.peer import same_user_only

    limited = {run_as_uid: (RUNTIME_PREFIX,)} if run_as_uid is not None else None
    main = uvicorn.Server(uvicorn.Config(same_user_only(app, limited=limited), host=config.host,
                                         port=config.port, workers=1,
                                         log_config=logs, access_log=True, **tls))
    fleet = _FleetServer(uvicorn.Config(fleet_only(app), host=fleet_host, port=fleet_port,
                                     workers=1, lifespan="off", log_config=logs,
                                     access_log=True, **tls))
    fleet_task = asyncio.create_task(fleet.serve())
    main_task = asyncio.create_task(main.serve())
    done, _ = await asyncio.wait({fleet_task, main_task}, return_when=asyncio.FIRST_COMPLETED)
    main.should_exit = fleet.should_exit = True  # one listener ended: stop the other
    await asyncio.gather(fleet_task, main_task, return_exceptions=True)
    for task in done:
        task.result()  # re-raise a listener's error (e.g. its port is taken)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, build Flower's SuperLink app, serve it on the two listeners."""
    from flwr.supercore import log

    ours, rest = _split(sys.argv[1:] if argv is None else argv)
    sys.argv = ["flower-superlink", *rest]
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    config = _parse_superlink_lifespan_config()
    if config.simulation:
        raise SystemExit("fedrac.deploy superlink: --simulation has no SuperNodes; use "
                         "flower-superlink")
    if ours.run_as_uid is not None:
        drop_serverapps(ours.run_as_uid, ours.run_as_gid, ours.run_as_home)
    app = create_app(config, SuperLinkLifespan)
    log(20, "fedrac: Control, ServerAppIo and Fleet APIs on %s:%s; Fleet API only on %s:%s",
        config.host, config.port, ours.fleet_host, ours.fleet_port)
    asyncio.run(_serve(app, config, ours.fleet_host, ours.fleet_port, ours.run_as_uid))


if __name__ == "__main__":
    main()
