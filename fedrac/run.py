"""One fedrac run: validated config in, results folder out, on the configured engine."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clients.client_app import make_client_app
from fedrac.data.summary import partition_summary
from fedrac.models.pretrain import pretrained_state
from fedrac.server.app import make_server_app
from fedrac.server.checkpoint import stop_on_signals
from fedrac.settings.typed import settings_of

log = logging.getLogger(__name__)


class RunFailedError(RuntimeError):
    """The run produced no usable result: the engine returned without writing its results,
    or no round had a valid reply (the CLI's exit code 3)."""


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's per-round INFO logs out of the console unless ``verbose``."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def run_experiment(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run the validated config ``cfg`` (a plain dict) and return its summary."""
    cfg = dict(cfg)
    engine = cfg["engine"]["name"]
    if engine == "deployment":
        raise ValueError("engine=deployment runs through Flower's CLI, not `fedrac`: start a "
                         "federation (python -m fedrac.deploy up) and use the `flwr run` line "
                         "it prints")
    settings = settings_of(cfg)  # typed, once; passed on instead of cfg
    run = settings.run
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    quiet_flower(run.verbose)
    if run.verbose:
        os.environ["FEDRAC_VERBOSE"] = "1"  # transformers' own reports too (fedrac/models/hf.py)
    # Pretrain (or load the cache) here, once, before any engine starts.
    pretrained_state(settings.model.options, settings.data.dataset, settings.model.pretrain,
                     run.cache_dir)
    partition_summary(settings, out)
    server_app, client_app = make_server_app(cfg), make_client_app(settings)
    print(f"fedrac: {settings.strategy.name} on {settings.data.name}, "
          f"{run.num_clients} clients, {run.num_rounds} rounds, engine {engine}; "
          f"results in {out}", flush=True)
    with stop_on_signals(out):  # SIGINT / SIGTERM: finish the round, checkpoint, stop
        if engine == "simulation":
            from fedrac.engines.simulation import run_on_ray

            run_on_ray(server_app, client_app, run.num_clients, run.engine, verbose=run.verbose)
        elif engine == "inline":
            from fedrac.engines.inline import run_inline, set_torch_threads

            set_torch_threads(run.engine.get("threads"))
            batch = None
            if run.engine.get("batched"):
                from clients.batched import batch_trainer

                batch = batch_trainer(settings)
            run_inline(server_app, client_app, run.num_clients, batch_train=batch)
        else:
            raise ValueError(f"engine={engine!r} is not an engine; allowed: simulation, inline")
    if not summary_path.exists():
        raise RunFailedError(f"the run ended without writing {summary_path}; "
                             "see the log above for the ServerApp's error")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") == "failed":
        raise RunFailedError(f"{summary['failure']}; results in {out}")
    return summary
