"""Where the Hydra config tree lives, and the checks a composed config must pass.

Every check raises :class:`ConfigError` with one line naming the key, the value
and what is allowed, before any work starts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and what is allowed."""


def conf_dir() -> Path:
    """The ``conf/`` tree: inside the installed package, else the source checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"fedrac's conf/ tree is missing (looked in {here} and its parent)")


def group_options(group: str) -> list[str]:
    """The option names of a config group (``strategy`` -> ``['fedavg', 'rac_lora']``)."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_group_overrides(overrides: Sequence[str]) -> None:
    """Reject ``group=name`` overrides whose option does not exist (sweeps included)."""
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            continue
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key not in groups or not value or value.startswith(("glob(", "range(", "choice(")):
            continue
        allowed = group_options(key)
        for option in value.split(","):
            if option not in allowed:
                raise ConfigError(
                    f"{key}={option!r} is not a known {key}; allowed: {', '.join(allowed)}"
                )


_VARIABLE = re.compile(r"\$[A-Za-z_]")
_PLAIN_VALUE = re.compile(r"^[\w\-+./:@%,]*$")


def expand_paths(overrides: Sequence[str]) -> list[str]:
    """``key=~/x`` and ``key=$VAR/x`` overrides with ``~`` and variables expanded.

    Hydra's grammar has no unquoted ``~`` and leaves ``$VAR`` as it is; this makes paths
    work as a shell user writes them. Quoted values, ``${...}`` interpolations and
    ``~key`` deletions are left alone; a sweep's comma-separated values expand one by one.
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        tilde = any(v.startswith("~") for v in value.split(","))
        if not sep or item.startswith("-") or value[:1] in ("'", '"') or not (
                tilde or _VARIABLE.search(value)):
            out.append(item)
            continue
        parts = [os.path.expandvars(os.path.expanduser(v)) for v in value.split(",")]
        expanded = ",".join(parts)
        if not _PLAIN_VALUE.match(expanded):
            expanded = ",".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
                                for v in parts)
        out.append(f"{key}={expanded}")
    return out


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def validate(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Resolve ``cfg`` to a plain dict and check every value (ConfigError on the first bad one)."""
    from strategies import STRATEGIES

    d: dict[str, Any] = (OmegaConf.to_container(cfg, resolve=True)
                         if isinstance(cfg, DictConfig) else dict(cfg))
    s = d["strategy"]
    _require(s.get("name") in STRATEGIES, "strategy", s.get("name"), ", ".join(STRATEGIES))
    strategy_cls = STRATEGIES[s["name"]]
    check_run(d, strategy_cls)
    check_client(d["client"])
    check_engine(d["engine"])
    check_strategy(s, strategy_cls)
    check_objects(d, strategy_cls)
    check_privacy(d)
    check_secagg(d)
    return d


def check_secagg(d: Mapping[str, Any]) -> None:
    """The ``secagg`` group (:func:`fedrac.secagg.check_config`)."""
    from fedrac.secagg import check_config

    try:
        check_config(d)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_privacy(d: Mapping[str, Any]) -> None:
    """The ``privacy`` group (:func:`fedrac.privacy.settings_from_config`: noise, clipping,
    a reachable target epsilon, an aggregation rule that keeps the sensitivity bound)."""
    from fedrac.privacy import settings_from_config

    settings_from_config(d)


def check_run(d: Mapping[str, Any], strategy_cls: type) -> None:
    """The run-level keys: rounds, clients, sampling, seed, device, evaluation, timeout."""
    s = d["strategy"]
    _require(_is_int(d["num_rounds"]) and d["num_rounds"] >= 1, "num_rounds", d["num_rounds"],
             "an integer >= 1")
    _require(_is_int(d["num_clients"]) and d["num_clients"] >= strategy_cls.min_clients,
             "num_clients", d["num_clients"],
             f"an integer >= {strategy_cls.min_clients} (the minimum of strategy {s['name']})")
    fr = d["fraction_train"]
    _require(_is_num(fr) and 0 < fr <= 1, "fraction_train", fr, "a number in (0, 1]")
    mac = d.get("min_available_clients")
    _require(mac is None or (_is_int(mac) and 1 <= mac <= d["num_clients"]),
             "min_available_clients", mac,
             f"null or an integer in 1..num_clients={d['num_clients']}")
    _require(_is_int(d["seed"]) and d["seed"] >= 0, "seed", d["seed"], "an integer >= 0")
    check_device(d["device"], d["engine"].get("name"))
    _require(_is_int(d["eval_every"]) and d["eval_every"] >= 1, "eval_every", d["eval_every"],
             "an integer >= 1")
    _require(_is_num(d["round_timeout"]) and d["round_timeout"] > 0, "round_timeout",
             d["round_timeout"], "a number of seconds > 0")
    ta = d.get("target_accuracy")
    _require(ta is None or (_is_num(ta) and 0 < ta <= 1) or (
        isinstance(ta, str) and ta.startswith("fpft-") and _is_num(_to_float(ta[5:]))),
        "target_accuracy", ta, "null, a number in (0, 1], or 'fpft-<points>' e.g. 'fpft-0.01'")


def check_device(device: Any, engine: str | None = None) -> None:
    """``cpu``, ``auto``, ``cuda`` or ``cuda:N`` (a GPU this machine has)."""
    allowed = "cpu, cuda, cuda:N (a GPU index), auto"
    ok = isinstance(device, str) and (device in ("cpu", "cuda", "auto") or (
        device.startswith("cuda:") and device[5:].isdigit()))
    _require(ok, "device", device, allowed)
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _require(count > 0, "device", device, "cpu, auto (no CUDA device is visible on this machine)")
    if device.startswith("cuda:"):
        index = int(device[5:])
        _require(index < count, "device", device,
                 f"cpu, cuda, auto, cuda:0..cuda:{count - 1} (this machine has {count} GPUs)")
        _require(engine != "simulation" or index == 0, "device", device,
                 "cuda with engine=simulation (Ray gives each client its GPU through "
                 "engine.client_resources.num_gpus)")


def check_client(c: Mapping[str, Any]) -> None:
    """The ``client.*`` local training settings."""
    from clients.local_training import OPTIMIZERS

    _require(c["optimizer"] in OPTIMIZERS, "client.optimizer", c["optimizer"],
             ", ".join(OPTIMIZERS))
    _require(_is_num(c["lr"]) and c["lr"] > 0, "client.lr", c["lr"], "a number > 0")
    _require(_is_int(c["local_epochs"]) and c["local_epochs"] >= 1, "client.local_epochs",
             c["local_epochs"], "an integer >= 1")
    _require(c["local_steps"] is None or (_is_int(c["local_steps"]) and c["local_steps"] >= 1),
             "client.local_steps", c["local_steps"], "null or an integer >= 1")
    _require(_is_int(c["batch_size"]) and c["batch_size"] >= 1, "client.batch_size",
             c["batch_size"], "an integer >= 1")
    _require(_is_num(c["weight_decay"]) and c["weight_decay"] >= 0, "client.weight_decay",
             c["weight_decay"], "a number >= 0")


def check_engine(e: Mapping[str, Any]) -> None:
    """The ``engine`` group."""
    _require(e.get("name") in ("simulation", "inline", "deployment"), "engine",
             e.get("name"), "simulation, inline, deployment")
    threads = e.get("threads")
    _require(threads is None or (_is_int(threads) and threads >= 1), "engine.threads", threads,
             "null or an integer >= 1")


def check_strategy(s: Mapping[str, Any], strategy_cls: type) -> None:
    """The ``strategy`` group's adapter keys (rank, alpha, sketch, trained factor, download)."""
    from fedrac.sketch import DISTRIBUTIONS

    if s["name"] != "fedavg":
        _require(_is_int(s.get("rank")) and s["rank"] >= 1, "strategy.rank", s.get("rank"),
                 "an integer >= 1")
        _require(_is_num(s.get("alpha")) and s["alpha"] > 0, "strategy.alpha", s.get("alpha"),
                 "a number > 0")
        _require(s.get("sketch") in DISTRIBUTIONS, "strategy.sketch", s.get("sketch"),
                 ", ".join(DISTRIBUTIONS))
        allowed_sides = getattr(strategy_cls, "TRAIN_FACTORS", ("A", "B", "auto"))
        _require(s.get("train_factor") in allowed_sides, "strategy.train_factor",
                 s.get("train_factor"), ", ".join(allowed_sides))
    downloads = getattr(strategy_cls, "DOWNLOADS", ("full",))
    _require(s.get("download", "full") in downloads, "strategy.download", s.get("download"),
             f"{', '.join(downloads)} (for strategy {s['name']})")


def check_objects(d: Mapping[str, Any], strategy_cls: type) -> None:
    """Build the task, model and partitions once: what only they can tell (shapes, ranks)."""
    from fedrac.data import load_task
    from fedrac.data.partitioners import check_partitions
    from fedrac.lora import AdapterConfigError, check_rank, find_target_layers
    from fedrac.models import build_model, check_model

    s = d["strategy"]
    try:
        task = load_task(d["dataset"])
        model = build_model(d["model"], task.input_shape, task.num_classes)
        check_model(model, d["model"], task.input_shape, task.num_classes)
        check_partitions(d["dataset"], d["partitioner"], d["num_clients"], d["seed"])
        layers = find_target_layers(model, d["model"].get("target_modules", ["all"]))
        if s["name"] != "fedavg":
            check_rank(layers, s["rank"])
        if hasattr(strategy_cls, "validate_config"):
            strategy_cls.validate_config(s)
    except (AdapterConfigError, ValueError) as err:
        raise ConfigError(str(err)) from err
