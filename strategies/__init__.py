"""Flower server strategies, one file per method; ``STRATEGIES`` maps config names to classes."""

from __future__ import annotations

from fedrac.privacy.dp import privacy_settings
from fedrac.settings.typed import Settings
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
    settings: Settings, layers, ledger: ByteLedger | None = None
) -> FedracStrategy:
    """The strategy named by ``strategy.name``, configured from the run's typed settings."""
    name, run = settings.strategy.name, settings.run
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not a strategy; allowed: {', '.join(STRATEGIES)}")
    common = dict(run_seed=run.seed, client=settings.client,
                  fraction_train=run.fraction_train, ledger=ledger,
                  min_available_nodes=int(run.min_available_clients or run.num_clients),
                  aggregator=build_aggregator(settings),
                  fraction_evaluate=run.fraction_evaluate or 0.0,
                  eval_every=run.eval_every, num_rounds=run.num_rounds,
                  privacy=privacy_settings(settings),
                  client_weighting=settings.strategy.client_weighting)
    return STRATEGIES[name].from_config(settings, layers, **common)


def build_aggregator(settings: Settings) -> Aggregator:
    """The run's :class:`Aggregator` from the ``aggregation`` group; ``max_client_weight=auto``
    caps at the largest partition outside deployment (where the server knows the partitions).
    """
    agg, run = dict(settings.strategy.aggregation), settings.run
    if agg.get("max_update_norm") == "default" and (
            settings.privacy.mode == "dp" or settings.privacy.secagg == "plus"):
        agg["max_update_norm"] = None  # DP bounds by its clip; SecAgg+ sees no update
    known = None
    if agg.get("max_client_weight", "auto") == "auto" and \
            run.engine.get("name") != "deployment" and settings.data.partitioner:
        from fedrac.data.partitioners import partition_sizes

        known = max(partition_sizes(settings.data.dataset, settings.data.partitioner,
                                    run.num_clients, run.seed))
    return Aggregator.from_config(agg, known_max_weight=known, run_seed=run.seed)
