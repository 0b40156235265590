"""A deployment node's fedrac config: composed from the run config's ``overrides`` string
(``flwr run . <federation> -c 'overrides="..."'``) and validated as the CLI's, or, for a resumed
run, from the run's own overrides that the ServerApp sends in every message.

Below the Flower apps (:mod:`fedrac.flower_apps`) and the node worker
(:mod:`fedrac.deploy.worker`), which both compose it.
"""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path, PurePath
from typing import Any

from flwr.app import Context, Message

OVERRIDES_KEY = "overrides"  # the run-config key (pyproject [tool.flwr.app.config])
RUN_OVERRIDES = "run-overrides"  # message config key: a resumed run's own overrides


def overrides_of(run_config: Any) -> str:
    """The Hydra overrides string of a run config (its ``overrides`` key; empty when unset)."""
    from fedrac.settings.config import ConfigError

    value = run_config.get(OVERRIDES_KEY, "") if run_config is not None else ""
    if not isinstance(value, str):
        raise ConfigError(f"run config {OVERRIDES_KEY}={value!r} is not allowed; "
                          "allowed: a string of Hydra overrides, e.g. \"num_rounds=20\"")
    return value


@functools.lru_cache(maxsize=4)
def _compose(overrides: str) -> str:
    from hydra import compose, initialize_config_dir

    from fedrac.settings.config import (
        ConfigError,
        check_added_keys,
        check_group_overrides,
        conf_dir,
        expand_paths,
        validate,
    )

    items = expand_paths(shlex.split(overrides))
    check_group_overrides(items)
    check_added_keys(items)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[*items, "engine=deployment"])
    d = validate(cfg)
    out = d.get("output_dir")
    if d.get("resume") and out is None:
        return json.dumps(d)  # the resumed run's own folder and config (fedrac.server.checkpoint)
    if out is not None and (not isinstance(out, str) or not PurePath(out).is_absolute()):
        raise ConfigError(f"output_dir={out!r} is not allowed under flwr run; allowed: an "
                          "absolute path on the server machine, e.g. output_dir=/srv/fedrac/run1")
    return json.dumps(d)


def deployment_config(run_config: Any) -> dict[str, Any]:
    """The validated fedrac config composed from a run config's ``overrides`` string."""
    return json.loads(_compose(overrides_of(run_config)))


def _resumes(overrides: str) -> bool:
    return any(i.lstrip("+~").startswith("resume=") for i in shlex.split(overrides))


def run_overrides(folder: str | Path, overrides: str) -> str:
    """The overrides the nodes of a resumed run compose their config from: the run's own
    (``<folder>/.hydra/overrides.yaml``) with ``num_rounds`` from ``overrides``."""
    from omegaconf import OmegaConf

    saved = Path(folder) / ".hydra" / "overrides.yaml"
    items = [str(i) for i in OmegaConf.load(saved)] if saved.is_file() else []
    items = [i for i in items if not i.lstrip("+~").startswith(("resume=", "num_rounds="))]
    items += [i for i in shlex.split(overrides) if i.lstrip("+~").startswith("num_rounds=")]
    return shlex.join(items)


def node_config(msg: Message, context: Context) -> dict[str, Any]:
    """A node's run config: from the run config's overrides, or, when they resume a run
    (``resume=DIR``, a folder on the server machine), from the run's own overrides, which the
    ServerApp sends in every message's config (``run-overrides``)."""
    from fedrac.settings.config import ConfigError

    own = overrides_of(context.run_config)
    if not _resumes(own):
        return deployment_config(context.run_config)
    config = msg.content.config_records.get("config")
    if config is None or RUN_OVERRIDES not in config:
        raise ConfigError(f"run config {OVERRIDES_KEY}={own!r} resumes a run, but the "
                          f"message carries no {RUN_OVERRIDES}; allowed: messages of fedrac's "
                          "ServerApp")
    return json.loads(_compose(str(config[RUN_OVERRIDES])))
