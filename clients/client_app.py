"""The fedrac ClientApp: Flower's message API around the module-level handlers."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import handlers
from clients.node_errors import reported
from clients.secagg import secagg_mod
from fedrac.settings.typed import Settings


def make_client_app(settings: Settings) -> ClientApp:
    """A ClientApp whose handlers train/evaluate as the run's typed settings say.

    The app is pickled by value into Ray workers (the settings with it: plain data), and
    the handlers live in :mod:`clients.handlers` so that workers import torch there. A
    handler's exception reaches the server as :class:`clients.node_errors.NodeError`, its
    text withheld unless ``verbose_node_errors``.
    """
    app = ClientApp(mods=[secagg_mod(lambda context: settings)])  # pass-through unless plus
    verbose = settings.run.verbose_node_errors

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with reported(verbose):
            return handlers.handle_train(settings, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        with reported(verbose):
            return handlers.handle_evaluate(settings, msg, context)

    return app
