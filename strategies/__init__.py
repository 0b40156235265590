"""Flower server strategies, one file per method; ``STRATEGIES`` maps config names to classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedrac.privacy.dp import settings_from_config
from fedrac.wire.ledger import ByteLedger
from strategies.aggregation import Aggregator
from strategies.base import FedracStrategy
from strategies.cola import Cola
from strategies.fed_sb import FedSB
from strategies.fedavg import FedAvgFPFT
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import FedIT
from strategies.ffa_lora import FFALoRA
from strategies.flora import FLoRA
from strategies.rac_lora import RacLoRA

STRATEGIES: dict[str, type[FedracStrategy]] = {
    cls.name: cls for cls in (FedAvgFPFT, RacLoRA, FFALoRA, FedIT, Cola, FedExLoRA, FLoRA,
                           FedSB)}


def build_strategy(
    cfg: Mapping[str, Any], layers, ledger: ByteLedger | None = None
) -> FedracStrategy:
    """The strategy named by ``strategy.name``, configured from the composed run config."""
    name = cfg["strategy"]["name"]
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not a strategy; allowed: {', '.join(STRATEGIES)}")
    common = dict(run_seed=int(cfg["seed"]), client_config=cfg["client"],
                  fraction_train=float(cfg["fraction_train"]), ledger=ledger,
                  min_available_nodes=int(cfg.get("min_available_clients") or cfg["num_clients"]),
                  aggregator=build_aggregator(cfg),
                  fraction_evaluate=float(cfg.get("fraction_evaluate") or 0.0),
                  eval_every=int(cfg.get("eval_every", 1)), num_rounds=int(cfg["num_rounds"]),
                  privacy=settings_from_config(cfg),
                  client_weighting=str(cfg["strategy"].get("client_weighting", "examples")))
    return STRATEGIES[name].from_config(cfg, layers, **common)


def build_aggregator(cfg: Mapping[str, Any]) -> Aggregator:
    """The run's :class:`Aggregator` from the ``aggregation`` group; ``max_client_weight=auto``
    caps at the largest partition outside deployment (where the server knows the partitions).
    """
    agg = dict(cfg.get("aggregation") or {})
    if agg.get("max_update_norm") == "default" and (
            (cfg.get("privacy") or {}).get("mode") == "dp"
            or (cfg.get("secagg") or {}).get("name") == "plus"):
        agg["max_update_norm"] = None  # DP bounds by its clip; SecAgg+ sees no update
    known = None
    if agg.get("max_client_weight", "auto") == "auto" and \
            (cfg.get("engine") or {}).get("name") != "deployment" and "partitioner" in cfg:
        from fedrac.data.partitioners import partition_sizes

        known = max(partition_sizes(cfg["dataset"], cfg["partitioner"], int(cfg["num_clients"]),
                                    int(cfg["seed"])))
    return Aggregator.from_config(agg, known_max_weight=known, run_seed=int(cfg["seed"]))
