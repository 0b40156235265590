"""The fedrac ClientApp: Flower's message API around the module-level handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import handlers
from clients.node_errors import reported
from clients.secagg import secagg_mod


def make_client_app(cfg: Mapping[str, Any]) -> ClientApp:
    """A ClientApp whose handlers train/evaluate as the composed run config ``cfg`` says.

    ``cfg`` must be a plain dict: the app is pickled by value into Ray workers, and
    the handlers live in :mod:`clients.handlers` so that workers import torch there. A
    handler's exception reaches the server as :class:`clients.node_errors.NodeError`, its
    text withheld unless ``verbose_node_errors``.
    """
    cfg = dict(cfg)
    app = ClientApp(mods=[secagg_mod(lambda context: cfg)])  # pass-through unless secagg=plus
    verbose = bool(cfg.get("verbose_node_errors", False))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with reported(verbose):
            return handlers.handle_train(cfg, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        with reported(verbose):
            return handlers.handle_evaluate(cfg, msg, context)

    return app
