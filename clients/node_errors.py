"""What a failing node tells the server: the exception's type and an error id, not its text.

An exception raised on a node can name the node's files (``data-path``), column names and
values. By default the error reply that reaches the server carries only the exception's
type and a random error id; the node logs the full error under that id. With
``verbose_node_errors=true`` the reply carries the full text. Errors fedrac words itself to
carry nothing of the node's (a sketch fingerprint mismatch) pass unchanged.

The ClientApp's code comes from whoever starts the run, so this guards against leaks into
the server's logs and results, not against a malicious server.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator

from fedrac.adapters.sketch import SketchMismatchError

log = logging.getLogger("fedrac.node")
PUBLIC_ERRORS: tuple[type[BaseException], ...] = (SketchMismatchError,)


class NodeError(RuntimeError):
    """A node's failure as the server sees it."""


def public_reason(err: BaseException, verbose: bool, error_id: str) -> str:
    """The text a node sends for ``err``: all of it when ``verbose`` (or a public error), else
    the exception's type and ``error_id``."""
    if verbose or isinstance(err, PUBLIC_ERRORS):
        return f"{type(err).__name__}: {err}"
    return (f"{type(err).__name__} on the node (error id {error_id}; its log has the details; "
            "verbose_node_errors=true sends them to the server)")


@contextlib.contextmanager
def reported(verbose: bool) -> Iterator[None]:
    """Run a handler; an exception is logged in full here and re-raised as :class:`NodeError`
    carrying only :func:`public_reason`, which is what Flower sends to the server."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every failure leaves the node this way
        error_id = uuid.uuid4().hex[:8]
        log.error("node error %s: %s: %s", error_id, type(err).__name__, err, exc_info=err)
        raise NodeError(public_reason(err, verbose, error_id)) from None
