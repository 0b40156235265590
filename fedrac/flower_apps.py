"""Module-level ServerApp and ClientApp for Flower's Deployment Runtime (``flwr run``).

Both compose the same Hydra config as the CLI, from the run-config key ``overrides``
(``flwr run . local -c 'overrides="num_rounds=20 output_dir=/abs/out"'``), validate
it, and call the engine-independent :func:`fedrac.server_app.run_server` and
:mod:`clients.handlers`.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
import time
from pathlib import Path, PurePath
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from clients import handlers
from clients.secagg import secagg_mod
from fedrac.config import ConfigError, check_group_overrides, conf_dir, expand_paths, validate
from fedrac.server_app import run_server

log = logging.getLogger(__name__)

OVERRIDES_KEY = "overrides"  # the run-config key (pyproject [tool.flwr.app.config])


def _overrides(run_config: Any) -> str:
    value = run_config.get(OVERRIDES_KEY, "") if run_config is not None else ""
    if not isinstance(value, str):
        raise ConfigError(f"run config {OVERRIDES_KEY}={value!r} is not allowed; "
                          "allowed: a string of Hydra overrides, e.g. \"num_rounds=20\"")
    return value


@functools.lru_cache(maxsize=4)
def _compose(overrides: str) -> str:
    from hydra import compose, initialize_config_dir

    items = expand_paths(shlex.split(overrides))
    check_group_overrides(items)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[*items, "engine=deployment"])
    d = validate(cfg)
    out = d.get("output_dir")
    if not isinstance(out, str) or not PurePath(out).is_absolute():
        raise ConfigError(f"output_dir={out!r} is not allowed under flwr run; allowed: an "
                          "absolute path on the server machine, e.g. output_dir=/srv/fedrac/run1")
    return json.dumps(d)


def deployment_config(run_config: Any) -> dict[str, Any]:
    """The validated fedrac config composed from a run config's ``overrides`` string."""
    return json.loads(_compose(_overrides(run_config)))


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


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = deployment_config(context.run_config)
    save_resolved_config(cfg, _overrides(context.run_config))
    if cfg.get("min_available_clients") is None:
        # Start when all num_clients nodes are connected, then let later rounds go on with
        # whoever is still connected: a dead node must not stall the run.
        wait_for_nodes(grid, int(cfg["num_clients"]))
        cfg["min_available_clients"] = 1
    run_server(cfg, grid)


client_app = ClientApp(mods=[secagg_mod(lambda context: deployment_config(context.run_config))])


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    return handlers.handle_train(deployment_config(context.run_config), msg, context)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    return handlers.handle_evaluate(deployment_config(context.run_config), msg, context)
