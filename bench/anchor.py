"""Flower's own ``FedAvg`` with a minimal ClientApp: the anchor fedrac's strategies are set beside.

Same workload as fedrac's ``fedavg`` (model, partitions, batch seeds, local settings,
server evaluation every round), through the same inline engine.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench.common import Workload, settings_of
from clients.handlers import SHUFFLE_STREAM
from clients.local_training import evaluate, train_locally
from fedrac.engines.inline import run_inline
from fedrac.sketch import derive_seed


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
