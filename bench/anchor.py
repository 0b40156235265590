"""Flower's own ``FedAvg`` with a minimal ClientApp: the anchor fedrac's strategies are set beside.

Same workload as fedrac's ``fedavg`` (model, partitions, batch seeds, local settings,
server evaluation every round), through the same inline engine. ``message_exchange`` is
the other anchor: a run's messages alone, with nothing done between them.
"""

from __future__ import annotations

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench.common import Workload, settings_of
from clients.handlers import SHUFFLE_STREAM, bind_reply
from fedrac.adapters import find_target_layers, resolve_trained
from fedrac.adapters.sketch import derive_seed
from fedrac.engines.inline import run_inline
from fedrac.run import quiet_flower
from fedrac.settings.typed import settings_of as typed_settings
from fedrac.training.local import evaluate, train_locally
from fedrac.wire.records import to_array_record
from strategies import build_strategy


def flower_fedavg(work: Workload) -> dict[str, torch.Tensor]:
    """Run Flower's FedAvg with a minimal ClientApp; return the final global weights."""
    cfg, model = work.cfg, work.model
    seed, cpu, n = int(cfg["seed"]), torch.device("cpu"), int(cfg["num_clients"])
    settings = settings_of(cfg)
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        for p in model.parameters():
            p.requires_grad_(True)
        x, y = work.data[pid]
        result = train_locally(model, x, y, settings,
                               derive_seed(seed, rnd, SHUFFLE_STREAM, pid), cpu)
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": result.num_examples,
                                                            "train-loss": result.loss})}),
                       reply_to=msg)

    final: dict[str, torch.Tensor] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            final.update(arrays.to_torch_state_dict())
            model.load_state_dict(final)
            loss, acc = evaluate(model, *work.test, cpu)
            return MetricRecord({"eval_loss": loss, "eval_accuracy": acc})

        strategy = FedAvg(fraction_train=float(cfg["fraction_train"]), fraction_evaluate=0.0,
                          min_available_nodes=n)
        strategy.start(grid, ArrayRecord(work.state), num_rounds=int(cfg["num_rounds"]),
                       evaluate_fn=evaluate_fn)

    run_inline(server, client, n)
    return final


def message_exchange(work: Workload) -> None:
    """Only the messages of a ``rac_lora`` run, through the inline engine: every round the
    strategy's own ``configure_train`` builds the messages (weights, sketch and train config
    records) and a null ClientApp replies at once with the trained factors' shapes and
    metrics. No training, no aggregation, no files: what Flower's message API and the
    engine cost by themselves, with the strategy's message making.
    """
    cfg = work.cfg
    quiet_flower(bool(cfg.get("verbose", False)))  # as a fedrac run: no per-round INFO lines
    layers = find_target_layers(work.model, cfg["model"]["target_modules"])
    strategy = build_strategy(typed_settings(cfg), layers)
    rank, side = int(cfg["strategy"]["rank"]), str(cfg["strategy"]["train_factor"])
    factors = {f"{name}.lora_{trained}": torch.zeros(spec.factor_shape(trained, rank))
               for name, spec in layers.items() for trained in [resolve_trained(spec, side)]}
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 50, "train-loss": 0.5, "train-seconds": 0.0,
                                "train-steps": 4})
        return bind_reply(msg, Message(RecordDict({"factors": to_array_record(factors),
                                                   "metrics": metrics}), reply_to=msg))

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        arrays = to_array_record(work.state)
        for rnd in range(1, int(cfg["num_rounds"]) + 1):
            grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))

    run_inline(server, client, int(cfg["num_clients"]))
