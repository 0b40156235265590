"""The plain PyTorch floor: the identical math of a fedrac run, with no framework.

Same model, pretrained weights, client partitions, sampled cohorts, visiting order, batch
seeds, sketches, weighted averages and merges as fedrac's ``rac_lora`` / ``fedavg``, and
the same server evaluations (before round 1, every ``eval_every`` rounds and after the
last) -- but no Flower messages, records, engine, ledger or results files. It is
pfl-research's design: one model in one process, clients trained one after another with
parameters overwritten in place.
"""

from __future__ import annotations

import random

import torch

from bench.common import Workload, settings_of
from clients.handlers import SHUFFLE_STREAM
from fedrac.adapters import adapter_factors, attach_adapters, find_target_layers, remove_adapters
from fedrac.adapters.sketch import derive_seed
from fedrac.training.local import evaluate, train_locally
from fedrac.wire.delta_sync import merge_factors
from strategies.base import SAMPLING_STREAM, weighted_average
from strategies.rac_lora import plan_round


def _cohort(work: Workload, rnd: int) -> list[int]:
    """Partition ids of round ``rnd``'s clients in the order fedrac visits them: the
    strategy's seeded sample of the node ids, sorted."""
    cfg = work.cfg
    pid = {node: i for i, node in enumerate(work.node_ids)}
    nodes = sorted(work.node_ids)
    size = max(int(len(nodes) * float(cfg["fraction_train"])), 1)
    if size < len(nodes):
        rng = random.Random(derive_seed(int(cfg["seed"]), rnd, SAMPLING_STREAM))
        nodes = sorted(rng.sample(nodes, size))
    return [pid[node] for node in nodes]


def plain_loop(work: Workload) -> dict[str, torch.Tensor]:
    """Run the config's strategy as a bare loop; return the final global weights."""
    cfg, model = work.cfg, work.model
    s, seed, cpu = cfg["strategy"], int(cfg["seed"]), torch.device("cpu")
    settings = settings_of(cfg)
    layers = find_target_layers(model, cfg["model"]["target_modules"])
    rank, alpha = int(s.get("rank", 1)), float(s.get("alpha", 1))
    global_state = {k: v.clone() for k, v in work.state.items()}
    rounds, every = int(cfg["num_rounds"]), int(cfg["eval_every"])
    model.load_state_dict(global_state)
    evaluate(model, *work.test, cpu)
    for rnd in range(1, rounds + 1):
        plan = plan_round(layers, derive_seed(seed, rnd), rank, s.get("sketch", "orthogonal"),
                          s.get("train_factor", "auto")) if s["name"] == "rac_lora" else None
        outs, weights = [], []
        for pid in _cohort(work, rnd):
            x, y = work.data[pid]
            model.load_state_dict(global_state)
            if plan is not None:
                factors = {}
                for name, spec in layers.items():
                    pair = [plan.sketches.get(f"{name}.lora_{side}",
                                              torch.zeros(spec.factor_shape(side, rank)))
                            for side in ("A", "B")]
                    factors[name] = (pair[0], pair[1])
                attach_adapters(model, layers, factors, rank, alpha, plan.trained)
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            result = train_locally(model, x, y, settings,
                                   derive_seed(seed, rnd, SHUFFLE_STREAM, pid), cpu)
            if plan is not None:
                outs.append(adapter_factors(model, trained_only=True))
                remove_adapters(model)
            else:
                outs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(float(result.num_examples))
        avg = weighted_average(outs, weights)
        if plan is not None:
            sketches = {k: v for k, v in plan.sketches.items() if k not in avg}
            global_state = merge_factors(global_state, layers, avg, sketches, alpha / rank)
        else:
            global_state = avg
        if rnd % every == 0 or rnd == rounds:
            model.load_state_dict(global_state)
            evaluate(model, *work.test, cpu)
    return global_state
