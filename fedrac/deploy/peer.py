"""Only the operator's account may talk to a local Flower API: the peer's uid of a loopback
TCP connection, read from the kernel's socket table (``/proc/net/tcp``).

Flower 1.41's Control API (``flwr`` CLI: start runs, register node keys) and a SuperNode's
Runtime API (``AcquireTask`` / ``PullMessages``: the app code and the messages) authenticate
nobody: its account authentication needs an OIDC plugin that open-source Flower does not ship,
its HTTP clients cannot reach a Unix-domain socket, and SuperExec authentication covers only
some Runtime routes. Every other local account reaches ``127.0.0.1``. So fedrac's launchers
wrap those listeners in :func:`same_user_only`: a request whose TCP peer is owned by another
uid than the server's (root excepted, which owns the machine anyway) is answered 403 before
Flower sees it. No cryptography: the kernel names the owner of each socket.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]
TABLES = ("/proc/net/tcp",)


def _hex_v4(host: str, port: int) -> str:
    return f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"


def peer_uid(client: tuple[str, int], server_port: int,
             tables: Iterable[str] = TABLES) -> int | None:
    """The uid owning the local socket ``client`` connected to ``server_port`` (``None``:
    not found, e.g. not a connection from this machine, or IPv6: refused, fedrac binds the
    local APIs to 127.0.0.1)."""
    host, port = client
    try:
        local = _hex_v4(host, port)
    except OSError:
        return None
    for table in tables:
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[1] == local and f[2].endswith(f":{server_port:04X}"):
                        return int(f[7])
        except OSError:
            continue
    return None


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return path.startswith(prefixes) and "/." not in path


def same_user_only(app: ASGIApp, uids: Iterable[int] | None = None,
                   limited: Mapping[int, Sequence[str]] | None = None) -> ASGIApp:
    """``app`` answering 403 to HTTP / websocket peers owned by a uid outside ``uids``
    (default: this process's uid and root); a uid in ``limited`` gets through only to paths
    starting with one of its prefixes (e.g. the account a root-started deployment runs its
    ServerApp as: the Runtime API, not the Control API)."""
    allowed = frozenset({os.getuid(), 0} if uids is None else uids)
    prefixes = {uid: tuple(p) for uid, p in (limited or {}).items()}

    async def guarded(scope: Scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            client, server = scope.get("client"), scope.get("server")
            uid = peer_uid(tuple(client), int(server[1])) if client and server else None
            if uid not in allowed and not (
                    uid in prefixes and _under(str(scope.get("path", "")), prefixes[uid])):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body",
                            "body": b"forbidden: only the operator's account may use this API\n"})
                return
        await app(scope, receive, send)

    return guarded
