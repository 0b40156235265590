"""The validated run config as typed settings: run, strategy, client, model, data, privacy.

:func:`fedrac.settings.config.validate` checks the composed config and returns it as a plain
dict (every error one line naming the key); :func:`settings_of` turns that dict into these
frozen dataclasses, once, without checking again. Keys keep their config names. A section's
keys that only some of its options have (a method's ``merge_every``, ``model=hf``'s
``checkpoint``) stay in its ``options`` mapping: the validated section itself, so code that
keys caches on a section (pretraining, the process's model) sees the very same values.

The entries type the config once (:func:`fedrac.run.run_experiment`,
:func:`fedrac.server.app.run_server`, the Flower ClientApp and the node worker per message)
and pass these on: the strategies, the server's results, checkpoints, tracker and monitor,
the client handlers, the batched trainer. :attr:`Settings.config`, the validated dict they
were made from, is read only where the config itself is the subject: hashed and saved with
a checkpoint, logged by a tracker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class MonitorSettings:
    """``monitor.*``: what the spectrum monitor writes per layer."""

    top_k: int
    rank_tol: float
    exact_max: int


@dataclass(frozen=True)
class RunSettings:
    """The run's own top-level keys (rounds, clients, seed, device, folders, logging), where
    it runs (``engine.*``), is tracked (``logger.*``) and how its lr is tuned (``tune.*``,
    with the tuned ``result`` once :func:`fedrac.tune.tune_lr` ran)."""

    num_rounds: int
    num_clients: int
    fraction_train: float
    fraction_evaluate: float
    min_available_clients: int | None
    seed: int
    device: str
    eval_every: int
    monitor_every: int
    monitor: MonitorSettings
    round_timeout: float
    output_dir: str | None
    overwrite: bool
    checkpoint_every: int
    resume: str | None
    cache_dir: str
    verbose: bool
    verbose_node_errors: bool
    progress: str
    target_accuracy: float | None
    engine: Mapping[str, Any]
    logger: Mapping[str, Any]
    tune: Mapping[str, Any]


@dataclass(frozen=True)
class StrategySettings:
    """``strategy.*``: the method and the keys every method has, its own in ``options`` (the
    whole section); how the server averages (``aggregation.*``)."""

    name: str
    rank: int | None
    alpha: float | None
    sketch: str | None
    train_factor: str | None
    resample_every: int | None
    download: str | None
    client_weighting: str
    options: Mapping[str, Any]
    aggregation: Mapping[str, Any]


@dataclass(frozen=True)
class ClientSettings:
    """``client.*``: local training (optimizer, schedule, precision, refactoring)."""

    optimizer: str
    lr: float
    local_epochs: int
    local_steps: int | None
    batch_size: int
    weight_decay: float
    weight_decay_mode: str
    momentum: float
    full_lr: float | None
    warmup_steps: int
    max_grad_norm: float | None
    refactor: str
    refactor_eps: float
    refactor_interval: int
    refactor_warmup_steps: int
    projected_step: bool
    precision: str
    grad_accum_steps: int


@dataclass(frozen=True)
class ModelSettings:
    """``model.*`` (with ``pretrain.*``): which model, its adapted layers, how it is
    pretrained; the option's own keys in ``options`` (the whole section)."""

    name: str | None
    target_modules: Sequence[str]
    options: Mapping[str, Any]
    pretrain: Mapping[str, Any]


@dataclass(frozen=True)
class DataSettings:
    """``dataset.*``, ``partitioner.*`` and ``task.*``: the data, its split across clients,
    and what is learnt from it."""

    dataset: Mapping[str, Any]
    partitioner: Mapping[str, Any]
    task: Mapping[str, Any]

    @property
    def name(self) -> str | None:
        """The dataset option (``digits``, ``files``, ...); ``None`` for a ``_target_``."""
        return self.dataset.get("name")


@dataclass(frozen=True)
class PrivacyOptions:
    """``privacy.*`` and ``secagg.*`` as configured (the noise multiplier a ``target_epsilon``
    implies is resolved by :func:`fedrac.privacy.dp.settings_from_config`)."""

    mode: str
    secagg: str
    privacy: Mapping[str, Any]
    secagg_options: Mapping[str, Any]


@dataclass(frozen=True)
class Settings:
    """A validated run config, typed; ``config`` is the validated dict itself."""

    run: RunSettings
    strategy: StrategySettings
    client: ClientSettings
    model: ModelSettings
    data: DataSettings
    privacy: PrivacyOptions
    config: Mapping[str, Any]


def _client(c: Mapping[str, Any]) -> ClientSettings:
    names = {f.name for f in fields(ClientSettings)}
    return ClientSettings(**{k: v for k, v in c.items() if k in names})


def settings_of(cfg: Mapping[str, Any]) -> Settings:
    """The typed settings of a config :func:`fedrac.settings.config.validate` returned."""
    s, m, mon = cfg["strategy"], cfg["model"], cfg.get("monitor") or {}
    run = RunSettings(
        num_rounds=int(cfg["num_rounds"]), num_clients=int(cfg["num_clients"]),
        fraction_train=float(cfg["fraction_train"]),
        fraction_evaluate=float(cfg.get("fraction_evaluate", 0.0)),
        min_available_clients=_int(cfg.get("min_available_clients")), seed=int(cfg["seed"]),
        device=str(cfg["device"]), eval_every=int(cfg["eval_every"]),
        monitor_every=int(cfg.get("monitor_every", 0)),
        monitor=MonitorSettings(top_k=int(mon.get("top_k", 8)),
                                rank_tol=float(mon.get("rank_tol", 1e-3)),
                                exact_max=int(mon.get("exact_max", 512))),
        round_timeout=float(cfg["round_timeout"]), output_dir=cfg.get("output_dir"),
        overwrite=bool(cfg.get("overwrite", False)),
        checkpoint_every=int(cfg.get("checkpoint_every", 0)), resume=cfg.get("resume"),
        cache_dir=str(cfg["cache_dir"]), verbose=bool(cfg.get("verbose", False)),
        verbose_node_errors=bool(cfg.get("verbose_node_errors", False)),
        progress=str(cfg.get("progress", "auto")),
        target_accuracy=_float(cfg.get("target_accuracy")),
        engine=cfg.get("engine") or {"name": "inline"},
        logger=cfg.get("logger") or {"name": "none"}, tune=cfg.get("tune") or {})
    strategy = StrategySettings(
        name=str(s["name"]), rank=_int(s.get("rank")), alpha=_float(s.get("alpha")),
        sketch=s.get("sketch"), train_factor=s.get("train_factor"),
        resample_every=_int(s.get("resample_every")), download=s.get("download"),
        client_weighting=str(s.get("client_weighting", "examples")), options=s,
        aggregation=cfg.get("aggregation") or {"name": "mean"})
    model = ModelSettings(name=m.get("name"), target_modules=m["target_modules"],
                          options=m, pretrain=cfg.get("pretrain") or {})
    data = DataSettings(dataset=cfg["dataset"],
                        partitioner=cfg.get("partitioner") or {},
                        task=cfg.get("task") or {"name": "classification"})
    privacy = PrivacyOptions(
        mode=str((cfg.get("privacy") or {}).get("mode", "none")),
        secagg=str((cfg.get("secagg") or {}).get("name", "none")),
        privacy=cfg.get("privacy") or {"mode": "none"},
        secagg_options=cfg.get("secagg") or {"name": "none"})
    return Settings(run=run, strategy=strategy, client=_client(cfg["client"]), model=model,
                    data=data, privacy=privacy, config=cfg)
