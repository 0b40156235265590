"""``python -m fedrac.deploy.supernode [--poll S] <flower-supernode arguments>``: Flower's
own ``flower-supernode``, polling the SuperLink every ``S`` seconds while idle.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever a pull finds no message (and 0.5 s
while it waits for a reply), so every round of a federation waits up to 3 s before its
nodes even see the round's messages: with warm node workers (:mod:`fedrac.deploy.worker`)
that wait is most of a round. This launcher runs the unchanged SuperNode with those
waits capped at ``S`` (default 0.1 s), its local Runtime API answered only to the operator's
account (:func:`guard_runtime_api`), and sets Flower's own
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` to ``S``; nothing else differs (same arguments,
TLS, authentication, heartbeats). Each idle node then sends up to 1/S pull requests a
second to the SuperLink: keep the default 3 s polling (plain ``flower-supernode``) for
federations of many nodes.
"""

from __future__ import annotations

import os
import sys
import time
import types

DEFAULT_POLL = 0.1


def cap_supernode_waits(poll: float) -> None:
    """Cap the SuperNode's fixed waits (its module's ``time.sleep``) at ``poll`` seconds."""
    from flwr.supernode import start_client_internal

    real = time.sleep
    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.sleep = lambda seconds: real(min(float(seconds), poll))
    start_client_internal.time = shim  # that module's `time.sleep(3)` and `(0.5)`


def guard_runtime_api() -> None:
    """Serve the SuperNode's local Runtime API (``--port``: the app code, ``AcquireTask``,
    ``PullMessages``) only to the operator's account (:func:`fedrac.deploy.peer.
    same_user_only`)."""
    from flwr.supernode import main as node_main

    from fedrac.deploy.peer import same_user_only

    create = node_main.create_app
    if getattr(create, "fedrac_guarded", False):
        return

    def create_app(*args, **kwargs):
        return same_user_only(create(*args, **kwargs))

    create_app.fedrac_guarded = True  # type: ignore[attr-defined]
    node_main.create_app = create_app


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode`` with ``argv`` (``--poll S`` taken out first)."""
    args = list(sys.argv[1:] if argv is None else argv)
    poll = DEFAULT_POLL
    if "--poll" in args:
        i = args.index("--poll")
        try:
            poll = float(args[i + 1])
        except (IndexError, ValueError):
            sys.exit("python -m fedrac.deploy.supernode: --poll needs a number of seconds, "
                     "e.g. --poll 0.1")
        if not 0.01 <= poll <= 3:
            sys.exit(f"python -m fedrac.deploy.supernode: --poll={poll} is not allowed; "
                     "allowed: 0.01 to 3 seconds")
        del args[i:i + 2]
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(poll))
    cap_supernode_waits(poll)
    guard_runtime_api()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
