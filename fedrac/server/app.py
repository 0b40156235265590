"""The fedrac ServerApp: pretrained model in, strategy rounds, server-side evaluation, results."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedrac.adapters import find_target_layers
from fedrac.adapters.quantized import load_state
from fedrac.data import load_splits, to_tensors
from fedrac.data.standardise import write_data_json
from fedrac.models.pretrain import pretrained_record
from fedrac.models.shared import config_model, module_keys
from fedrac.server.checkpoint import Checkpointer, RunInterrupted, set_rng_state
from fedrac.server.divergence import DivergenceGuard, RunDiverged
from fedrac.server.outputs import claim_output_dir, release_output_dir
from fedrac.server.results import RunRecorder
from fedrac.server.spectrum import global_factors, monitor_from_config
from fedrac.settings.typed import Settings, settings_of
from fedrac.tasks import task_of
from fedrac.training.local import move_to, resolve_device
from fedrac.wire.records import (
    to_array_record,
    to_shared_state_dict,
)
from strategies import build_strategy

log = logging.getLogger(__name__)


def run_server(cfg: Mapping[str, Any], grid: Grid, node_overrides: str | None = None
               ) -> dict[str, Any]:
    """Run ``num_rounds`` of the configured strategy over ``grid``; write and return results.

    The server evaluates with the task's metrics on the target test split, on this
    process's model instance (shared with clients simulated in the same process). The
    output folder is claimed (one run per folder, also under ``flwr run``) until it returns.
    ``node_overrides``: sent in every message's config (``run-overrides``) for nodes that
    resume a deployment run (:func:`fedrac.settings.deployment.node_config`).
    """
    settings = settings_of(cfg)  # typed, once; passed on instead of cfg
    claim_output_dir(settings.run.output_dir)
    try:
        return _run_server(settings, grid, node_overrides)
    finally:
        release_output_dir(settings.run.output_dir)


def _run_server(settings: Settings, grid: Grid, node_overrides: str | None
                ) -> dict[str, Any]:
    run, data = settings.run, settings.data
    splits = load_splits(data.dataset)
    from fedrac.tasks.generation import generation_metrics, generation_setup

    # task.generate_eval: greedy answers to held-out prompts, scored (checked before any file)
    generate = generation_setup(data, to_tensors(splits.target_test)[0])
    # W0 first: read from the process's model while it is still as built (one build)
    initial = pretrained_record(settings.model.options, data.dataset, settings.model.pretrain,
                                run.cache_dir)
    model = config_model(settings)
    state = dict(to_shared_state_dict(initial))  # W0: read-only views of the record
    load_state(model, state)
    layers = find_target_layers(model, settings.model.target_modules)
    strategy = build_strategy(settings, layers)
    if getattr(strategy, "layers", None):  # an adapter method: new heads are trained in full
        strategy.set_trainable_modules({k: tuple(p.shape)
                                        for k, p in module_keys(model, settings.model).items()})
    if splits.standardisation is not None:
        strategy.data_config = splits.standardisation.wire()  # for nodes with their own data
        write_data_json(run.output_dir, {"standardisation": splits.standardisation.to_json(),
                                         "nan": data.dataset.get("nan") or "error"})
    if node_overrides is not None:
        strategy.data_config["run-overrides"] = node_overrides
    num_rounds, every = run.num_rounds, run.eval_every
    recorder = RunRecorder(run.output_dir, settings, strategy.ledger, strategy.round_metrics,
                           num_rounds, privacy=strategy.privacy_summary())
    device = resolve_device(run.device)
    task = task_of(data)
    x_test, y_test = to_tensors(splits.target_test)
    latest = {"arrays": initial}
    monitor = monitor_from_config(run, layers, state)
    secagg = settings.privacy.secagg == "plus"
    ckpt = None if secagg else Checkpointer(settings, strategy, recorder, grid, monitor)
    if splits.label_names:
        print("labels: " + ", ".join(f"{i}={n}" for i, n in enumerate(splits.label_names)),
              flush=True)

    guard = DivergenceGuard(state)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        weights = to_shared_state_dict(arrays)  # read-only views: no copy of the model
        if server_round > 0:
            guard.observe(server_round, weights)  # RunDiverged
        latest["arrays"] = arrays
        if monitor.due(server_round):
            monitor.observe(server_round, weights, global_factors(strategy))
        if server_round % every and server_round != num_rounds:
            recorder.log_round(server_round, math.nan, math.nan)
            return None
        load_state(model, weights)
        move_to(model, device)
        metrics = task.evaluate(model, x_test, y_test, device)
        if generate is not None:
            metrics.update(generation_metrics(model, device=device, **generate))
        recorder.log_round(server_round, metrics["eval_loss"], metrics["eval_accuracy"],
                           metrics.get("eval_perplexity", math.nan), metrics)
        return MetricRecord(metrics)

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        result = evaluate_fn(server_round, arrays)
        if ckpt is not None:
            ckpt.after_round(server_round, lambda: to_shared_state_dict(arrays))
        return result

    first_round, interrupted, diverged = 1, None, None
    if run.resume and ckpt is not None:
        done, weights, rng = ckpt.restore()
        latest["arrays"] = initial = to_array_record(weights)
        first_round = done + 1
        print(f"fedrac: resuming {run.output_dir} after round {done} of {num_rounds}",
              flush=True)
        guard = DivergenceGuard(weights)  # bound: 10x the resumed weights' norm at first
        set_rng_state(rng)  # last: nothing may draw between here and round `done + 1`
    try:
        if secagg:
            from fedrac.privacy.secagg import run_secagg

            recorder.secagg = run_secagg(strategy, grid, initial, num_rounds,
                                         run.round_timeout, evaluate_fn,
                                         settings.privacy.secagg_options)
        else:
            strategy.start(grid, initial, num_rounds=num_rounds,
                           timeout=run.round_timeout, evaluate_fn=end_of_round,
                           first_round=first_round)
    except RunInterrupted as stop:
        interrupted = stop
    except RunDiverged as err:  # the result is the last good model; the run failed
        diverged = err
        log.error("fedrac: %s", err)
    final = dict(to_shared_state_dict(latest["arrays"]))
    monitor.close()
    extra: dict[str, Any] = {"spectrum": monitor.summary(),
                             "model_changed": not same_state(state, final),
                             "last_problem": getattr(strategy, "last_problem", None)}
    if ckpt is not None:
        extra.update(ckpt.summary())
    if interrupted is not None:
        extra.update({"interrupted": True, "interrupted_after_round": interrupted.server_round,
                      "signal": signal.Signals(interrupted.signum).name})
    if diverged is not None:
        extra["diverged"] = {"round": diverged.server_round, "reason": diverged.reason}
    if splits.label_names:
        extra["label_names"] = list(splits.label_names)
    if settings.model.name == "hf":
        from fedrac.models.export import (
            export_transformers,
            set_label_names,
            tidy_adapter_config,
            truncation_hint,
        )

        set_label_names(model, splits.label_names)
        merged = getattr(strategy, "export_factors", lambda: None)()
        extra["export"] = export_transformers(settings, model, layers, state, final,
                                              run.output_dir, merged)
        tidy_adapter_config(f"{run.output_dir}/adapter")
        if hint := truncation_hint(extra["export"]):
            print(hint, flush=True)
    summary = recorder.finish(final, extra)
    if ckpt is not None and ckpt.count:
        print(f"fedrac: {ckpt.count} checkpoints in {ckpt.dir / 'checkpoint'}, "
              f"{1000 * extra['checkpoint_seconds_each']:.1f} ms each", flush=True)
    return summary


def same_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two state dicts hold the same keys with bit-identical tensors."""
    return set(a) == set(b) and all(
        a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].to(a[k].dtype).cpu())
        for k in a)


def make_server_app(cfg: Mapping[str, Any]) -> ServerApp:
    """A ServerApp running :func:`run_server` with the composed run config ``cfg``."""
    cfg = dict(cfg)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(cfg, grid)

    return app
