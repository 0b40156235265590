"""Flower's Simulation Runtime (Ray backend) as a fedrac engine."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def run_on_ray(
    server_app: ServerApp, client_app: ClientApp, num_supernodes: int,
    engine_cfg: Mapping[str, Any], verbose: bool = False,
) -> None:
    """Run the apps with ``flwr.simulation.run_simulation`` and ``client_resources`` from config.

    ``engine_cfg["address"]`` (e.g. ``"10.0.0.5:6379"`` or ``"auto"``) joins that running Ray
    cluster (Flower passes ``init_args`` to ``ray.init``): each client then takes
    ``client_resources`` on whichever of the cluster's machines has them free.
    """
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    resources = {k: float(v) for k, v in dict(engine_cfg.get("client_resources", {})).items()}
    init_args: dict[str, Any] = {"include_dashboard": False}
    if engine_cfg.get("address"):
        init_args["address"] = str(engine_cfg["address"])
    if not verbose:
        init_args["logging_level"] = logging.ERROR
        init_args["log_to_driver"] = True
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=int(num_supernodes),
        backend_config={"client_resources": resources, "init_args": init_args},
        verbose_logging=verbose,
    )
