"""The fedrac ServerApp: pretrained model in, strategy rounds, server-side evaluation, results."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clients.local_training import evaluate, resolve_device
from fedrac.data import load_task, to_tensors
from fedrac.lora import find_target_layers
from fedrac.models import build_model
from fedrac.models.pretrain import pretrained_state
from fedrac.records import to_array_record, to_shared_state_dict, to_state_dict
from fedrac.results import RunRecorder
from strategies import build_strategy

log = logging.getLogger(__name__)


def run_server(cfg: Mapping[str, Any], grid: Grid) -> dict[str, Any]:
    """Run ``num_rounds`` of the configured strategy over ``grid``; write and return results."""
    task = load_task(cfg["dataset"])
    model = build_model(cfg["model"], task.input_shape, task.num_classes)
    state = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], cfg["cache_dir"])
    model.load_state_dict(state)
    layers = find_target_layers(model, cfg["model"]["target_modules"])
    strategy = build_strategy(cfg, layers)
    num_rounds, every = int(cfg["num_rounds"]), int(cfg["eval_every"])
    recorder = RunRecorder(cfg["output_dir"], cfg, strategy.ledger, strategy.round_metrics,
                           num_rounds, privacy=strategy.privacy_summary())
    device = resolve_device(str(cfg["device"]))
    model.to(device)
    x_test, y_test = to_tensors(task.target_test)
    initial = to_array_record(state)
    latest = {"arrays": initial}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        latest["arrays"] = arrays
        if server_round % every and server_round != num_rounds:
            recorder.log_round(server_round, math.nan, math.nan)
            return None
        model.load_state_dict(to_shared_state_dict(arrays))
        loss, acc = evaluate(model, x_test, y_test, device)
        recorder.log_round(server_round, loss, acc)
        return MetricRecord({"eval_loss": loss, "eval_accuracy": acc})

    if (cfg.get("secagg") or {}).get("name", "none") == "plus":
        from fedrac.secagg import run_secagg

        recorder.secagg = run_secagg(strategy, grid, initial, num_rounds,
                                     float(cfg["round_timeout"]), evaluate_fn, cfg["secagg"])
    else:
        strategy.start(grid, initial, num_rounds=num_rounds,
                       timeout=float(cfg["round_timeout"]), evaluate_fn=evaluate_fn)
    return recorder.finish(to_state_dict(latest["arrays"]))


def make_server_app(cfg: Mapping[str, Any]) -> ServerApp:
    """A ServerApp running :func:`run_server` with the composed run config ``cfg``."""
    cfg = dict(cfg)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(cfg, grid)

    return app
