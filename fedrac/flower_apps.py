"""Module-level ServerApp and ClientApp for Flower's Deployment Runtime (``flwr run``).

Both compose the same Hydra config as the CLI, from the run-config key ``overrides``
(``flwr run . local -c 'overrides="num_rounds=20 output_dir=/abs/out"'``), validate
it, and call the engine-independent :func:`fedrac.server.app.run_server` and
:mod:`clients.handlers`. When the SuperNode's environment names a node worker folder
(``FEDRAC_WORKER_DIR``; see :mod:`fedrac.deploy.worker`), the ClientApp hands each message
to that node's warm worker instead. Heavy imports (torch, Hydra, data) happen only where
they are used, so that Flower's per-message ``flwr-clientapp`` process stays light.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrac.settings.deployment import (  # noqa: F401 - also this module's API
    OVERRIDES_KEY,
    RUN_OVERRIDES,
    deployment_config,
    node_config,
    overrides_of,
    run_overrides,
)
from fedrac.settings.typed import Settings, settings_of  # stdlib only: light

log = logging.getLogger(__name__)


def sets_num_clients(overrides: str) -> bool:
    """Whether the run's overrides give ``num_clients`` themselves."""
    return any(i.lstrip("+").split("=", 1)[0].strip() == "num_clients"
               for i in shlex.split(overrides))


def default_output_dir(run_id: int) -> str:
    """Where a ``flwr run`` without ``output_dir`` writes: ``~/fedrac-runs/run-<run id>``."""
    return str(Path.home() / "fedrac-runs" / f"run-{run_id}")


def is_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's Simulation Runtime (``flwr run .`` on a local SuperLink)."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def simulated_nodes(grid: Grid, settle: float = 1.0, poll: float = 0.1,
                    limit: float = 120.0) -> list[int]:
    """The simulation's SuperNodes once their number has not changed for ``settle`` s (the
    Simulation Runtime registers them while the ServerApp starts)."""
    nodes: list[int] = []
    stable_since = end = time.monotonic()
    end += limit
    while time.monotonic() < end:
        now = list(grid.get_node_ids())
        if len(now) != len(nodes):
            nodes, stable_since = now, time.monotonic()
        elif nodes and time.monotonic() - stable_since >= settle:
            break
        time.sleep(poll)
    return nodes


def match_simulated_nodes(cfg: dict[str, Any], overrides: str, nodes: int) -> None:
    """Make ``num_clients`` the simulation's number of SuperNodes when the overrides leave it
    unset; a different ``num_clients`` given there stops the run with one line."""
    from fedrac.settings.config import ConfigError

    wanted = int(cfg["num_clients"])
    if wanted == nodes:
        return
    if sets_num_clients(overrides):
        raise ConfigError(
            f"num_clients={wanted} is not allowed on this simulation of {nodes} SuperNodes; "
            f"allowed: num_clients={nodes}, or flwr run . --federation-config "
            f"'num-supernodes={wanted}'")
    print(f"fedrac: num_clients={nodes}, the simulation's SuperNodes (flwr run . "
          "--federation-config 'num-supernodes=N' changes it)", flush=True)
    cfg["num_clients"] = nodes


def save_resolved_config(cfg: dict[str, Any], overrides: str) -> Path:
    """Write ``<output_dir>/.hydra/config.yaml`` and ``overrides.yaml``, as a Hydra run does."""
    from omegaconf import OmegaConf

    folder = Path(cfg["output_dir"]) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(shlex.split(overrides)), folder / "overrides.yaml")
    return folder


def wait_for_nodes(grid: Grid, wanted: int, poll: float = 1.0) -> list[int]:
    """Block until ``wanted`` SuperNodes are connected; return their ids."""
    last = -1
    while len(nodes := list(grid.get_node_ids())) < wanted:
        if len(nodes) != last:
            log.warning("waiting for SuperNodes: %d of %d connected", len(nodes), wanted)
            last = len(nodes)
        time.sleep(poll)
    return nodes


class PromptGrid(Grid):
    """The ServerApp's ``Grid``, pulling replies every ``poll`` s instead of every 3 s.

    Flower 1.41's ``send_and_receive`` sleeps 3 s between pulls, so a round's replies wait
    up to 3 s on the SuperLink. Same pushes, pulls and timeout semantics, through the
    wrapped grid's own ``push_messages`` / ``pull_messages``.
    """

    def __init__(self, grid: Grid, poll: float = 0.1) -> None:
        self._grid, self._poll = grid, poll

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @property
    def run(self) -> Any:
        return self._grid.run

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        return list(self._grid.get_node_ids())

    def push_messages(self, messages: Any) -> Any:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; pull their replies every ``poll`` s until all came or
        ``timeout`` s passed (``None``: wait for all)."""
        wanted = set(self.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(wanted))
            replies += got
            wanted -= {m.metadata.reply_to_message_id for m in got}
            if not wanted:
                break
            time.sleep(self._poll)
        return replies


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedrac.server.outputs import check_output_dir, clear_results

    cfg = deployment_config(context.run_config)
    overrides = overrides_of(context.run_config)
    simulation = is_simulation(grid)
    if simulation:  # Flower's local simulation: as many clients as it has SuperNodes
        match_simulated_nodes(cfg, overrides, len(simulated_nodes(grid)))
    if cfg.get("output_dir") is None:
        cfg["output_dir"] = default_output_dir(context.run_id)
        print(f"fedrac: results in {cfg['output_dir']} (set output_dir=/abs/path to choose)",
              flush=True)
    resumed = bool(cfg.get("resume"))
    node_overrides = None
    # resumed: the saved config of that run (fedrac.server.checkpoint), with the few overrides kept
    if resumed:
        from fedrac.server.checkpoint import resume_config

        given = cfg
        overrides = overrides_of(context.run_config)
        cfg = resume_config(cfg["resume"], shlex.split(overrides), given)
        # the nodes cannot read the folder: they get the run's own overrides in each message
        node_overrides = run_overrides(cfg["output_dir"], overrides)
    check_output_dir(cfg)  # a folder holding a run is refused (overwrite=true, resume=)
    if cfg.get("overwrite") and not cfg.get("resume"):
        clear_results(cfg["output_dir"])
    if not resumed:
        save_resolved_config(cfg, overrides)
    grid = PromptGrid(grid)
    if resumed:
        wait_for_nodes(grid, int(cfg["num_clients"]))
    elif cfg.get("min_available_clients") is None:
        # Start when all num_clients nodes are connected, then let later rounds go on with
        # whoever is still connected: a dead node must not stall the run.
        wait_for_nodes(grid, int(cfg["num_clients"]))
        cfg["min_available_clients"] = 1
    from fedrac.run import RunFailedError
    from fedrac.server.app import run_server

    summary = run_server(cfg, grid, node_overrides=node_overrides)
    if summary.get("status") == "failed":  # Flower marks the run failed, with this reason
        raise RunFailedError(f"{summary['failure']}; results in {cfg['output_dir']}")


def _client(kind: str, msg: Message, context: Context) -> Message:
    """Handle ``msg`` in this node's warm worker when there is one, else here."""
    folder = os.environ.get("FEDRAC_WORKER_DIR")  # fedrac.deploy.worker.WORKER_DIR_ENV
    if folder:
        from fedrac.deploy.worker import call_worker

        return call_worker(folder, kind, msg, context)
    from clients import handlers
    handle = handlers.handle_train if kind == "train" else handlers.handle_evaluate
    cfg = node_config(msg, context)
    parts = context.node_config.get("num-partitions")
    if parts is not None and not sets_num_clients(overrides_of(context.run_config)):
        cfg["num_clients"] = int(parts)  # Flower's simulation: as the ServerApp does
    return handle(settings_of(cfg), msg, context)  # typed once, here


def _secagg_settings(context: Context) -> Settings | None:
    """The run's settings for :func:`clients.secagg.secagg_mod`, composed only when the
    overrides ask for SecAgg+ (this short-lived process otherwise stays light): else None."""
    if not any(i.lstrip("+").replace(" ", "") in ("secagg=plus",)
               for i in shlex.split(overrides_of(context.run_config))):
        return None
    return settings_of(deployment_config(context.run_config))


def _client_mods() -> list:
    from clients.secagg import secagg_mod

    return [secagg_mod(_secagg_settings)]


client_app = ClientApp(mods=_client_mods())


def _verbose(run_config: Any) -> bool:
    """Whether the run's overrides set ``verbose_node_errors=true`` (read without composing
    the config, which the warm path avoids in this short-lived process)."""
    try:
        items = shlex.split(overrides_of(run_config))
    except Exception:  # noqa: BLE001 - a bad config is reported (tersely) by the handler
        return False
    return any(i.lstrip("+").lower() in ("verbose_node_errors=true", "verbose_node_errors=1")
               for i in items)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    from clients.node_errors import reported

    with reported(_verbose(context.run_config)):
        return _client("train", msg, context)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    from clients.node_errors import reported

    with reported(_verbose(context.run_config)):
        return _client("evaluate", msg, context)
