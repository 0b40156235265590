"""Where the Hydra config tree lives, and the checks a composed config must pass.

Every check raises :class:`ConfigError` with one line naming the key, the value
and what is allowed, before any work starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedrac.settings.errors import ConfigError, _require


def _minilm(cache_dir: str) -> str:
    from fedrac.experiments.text_minilm import minilm_path

    return minilm_path(cache_dir)


# ${fedrac.minilm:<cache_dir>}: the packaged all-MiniLM-L6-v2 checkpoint (+experiment=text_minilm)
OmegaConf.register_new_resolver("fedrac.minilm", _minilm, replace=True)
_UID = f"{os.getpid():x}{secrets.token_hex(2)}"
# ${fedrac.uid:}: this process's unique id (default output folders of runs started together)
OmegaConf.register_new_resolver("fedrac.uid", lambda: _UID, replace=True)


def conf_dir() -> Path:
    """The ``conf/`` tree: inside the installed package, else the source checkout's."""
    package = Path(__file__).resolve().parent.parent  # fedrac/ (this file is fedrac/settings/)
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"fedrac's conf/ tree is missing (looked in {package} and its parent)")


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


def _section_keys(data: Any, section: str, global_package: bool) -> set[str]:
    part = data.get(section) if global_package and isinstance(data, Mapping) else data
    return {str(k) for k in part} if isinstance(part, Mapping) else set()


def known_keys(section: str) -> set[str]:
    """Every key that some config in ``conf/`` gives the section ``section`` (``strategy``:
    the keys of all strategies; ``""``: the top-level keys and groups)."""
    import yaml

    root = conf_dir()
    keys: set[str] = set()
    for path in root.rglob("*.yaml"):
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        rel = path.relative_to(root).parts
        global_package = "@package _global_" in text or len(rel) == 1
        if not section:
            if len(rel) == 1:
                keys |= {str(k) for k in data if k != "defaults"}
                keys |= {p.name for p in root.iterdir() if p.is_dir()}
            continue
        if rel[0] == section and len(rel) == 2 and not global_package:
            keys |= _section_keys(data, section, False)
        elif global_package:
            keys |= _section_keys(data, section, True)
    return keys - {"defaults"}


def check_added_keys(overrides: Sequence[str]) -> None:
    """Reject ``+key=value`` overrides adding a key that no config and no code reads (a typo
    such as ``+strategy.rnak=4``); free-form places (a custom model's keywords,
    ``dataset.kwargs``) and ``hydra.*`` are left alone."""
    items = [o for o in overrides if o.startswith("+") and not o.startswith("++") and "=" in o]
    custom_model = any(o.lstrip("+").startswith(("model=custom", "model._target_="))
                       for o in overrides)
    for item in items:
        key, _, value = item[1:].partition("=")
        parts = key.split(".")
        section = parts[0] if len(parts) > 1 else ""
        if section == "hydra" or (section == "dataset" and parts[1] == "kwargs") or \
                (section == "model" and custom_model):
            continue
        name = parts[1] if section else parts[0]
        known = known_keys(section)
        if name not in known:
            scope = f"the keys of {section}" if section else "the top-level keys and groups"
            raise ConfigError(f"+{key}={value} adds a key that no code reads; allowed: {scope}: "
                              f"{', '.join(sorted(known))}")


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
    from omegaconf.errors import InterpolationResolutionError

    from strategies import STRATEGIES

    try:
        d: dict[str, Any] = (OmegaConf.to_container(cfg, resolve=True)
                             if isinstance(cfg, DictConfig) else dict(cfg))
    except InterpolationResolutionError as err:  # a resolver's own one-line error
        raise ConfigError(str(err.__cause__ or err).splitlines()[0]) from err
    check_sections(d)
    s = d["strategy"]
    _require(s.get("name") in STRATEGIES, "strategy", s.get("name"), ", ".join(STRATEGIES))
    strategy_cls = STRATEGIES[s["name"]]
    resolve_packaged(d)
    link_task(d)
    check_run(d, strategy_cls)
    check_client(d["client"], strategy_cls, d.get("device", "cpu"))
    check_pretrain(d["pretrain"])
    check_task(d)
    check_engine(d["engine"])
    check_strategy(s, strategy_cls)
    if hasattr(strategy_cls, "validate_run"):  # options the method cannot serve
        try:
            strategy_cls.validate_run(d)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    check_guards(d, strategy_cls)
    check_secagg(d)  # config only: before the model and data are built
    if not d.get("runner"):  # an experiment with its own loop builds (and checks) its own
        check_objects(d, strategy_cls)
    check_privacy(d)
    check_tune(d)
    return d


SECTIONS = ("strategy", "dataset", "model", "partitioner", "engine", "client", "pretrain")


def check_sections(d: Mapping[str, Any]) -> None:
    """The groups and sections are mappings (``client=3`` replaces one with a number)."""
    for key in SECTIONS:
        _require(isinstance(d.get(key), Mapping), key, d.get(key),
                 f"a mapping of {key}.* keys (set one key: {key}.<key>=<value>)")


def check_pretrain(p: Mapping[str, Any]) -> None:
    """The ``pretrain.*`` settings (centralized pretraining on the source task)."""
    from fedrac.training.local import OPTIMIZERS

    _require(p.get("optimizer", "adamw") in OPTIMIZERS, "pretrain.optimizer",
             p.get("optimizer"), ", ".join(OPTIMIZERS))
    lr = p.get("lr", 0.01)
    _require(_is_num(lr) and lr > 0, "pretrain.lr", lr, "a number > 0")
    epochs = p.get("epochs", 0)
    _require(_is_int(epochs) and epochs >= 0, "pretrain.epochs", epochs,
             "an integer >= 0 (0: no pretraining)")
    bs = p.get("batch_size", 32)
    _require(_is_int(bs) and bs >= 1, "pretrain.batch_size", bs, "an integer >= 1")
    seed = p.get("seed", 0)
    _require(_is_int(seed) and seed >= 0, "pretrain.seed", seed, "an integer >= 0")


def resolve_packaged(d: dict[str, Any]) -> None:
    """``model.path`` / ``model.tokenizer`` naming a packaged model (``minilm``): its extracted
    checkpoint folder under ``cache_dir`` (in place; :mod:`fedrac.models.packaged`)."""
    from fedrac.models.packaged import packaged_name, packaged_path

    if d["model"].get("name") != "hf":
        return
    for key in ("path", "tokenizer"):
        value = d["model"].get(key)
        if packaged_name(value) and not os.path.exists(os.path.expanduser(str(value))):
            try:
                d["model"][key] = packaged_path(value, d.get("cache_dir") or "~/.cache/fedrac",
                                                f"model.{key}")
            except ValueError as err:
                raise ConfigError(str(err)) from err


def link_task(d: dict[str, Any]) -> None:
    """Fill in what the model and the data take from each other (in place).

    ``model.task`` (which head a transformers model gets) is the task's name; a text
    dataset gets ``dataset.task``, ``dataset.tokenizer`` (``model.tokenizer``, else
    ``model.path``) and ``dataset.cache_dir`` (where its tokenised rows are cached).
    """
    from fedrac.data.text import is_text

    task = d.get("task") or {"name": "classification"}
    d["task"] = task
    if d["model"].get("name") == "hf":
        d["model"]["task"] = task.get("name")
    if task.get("name") == "causal_lm":
        link_causal_lm(d)
    if is_text(d["dataset"]):
        d["dataset"]["task"] = task.get("name")
        if not d["dataset"].get("tokenizer") and d["model"].get("name") == "hf":
            d["dataset"]["tokenizer"] = d["model"].get("tokenizer") or d["model"].get("path")
        d["dataset"].setdefault("cache_dir", d.get("cache_dir"))


def link_causal_lm(d: dict[str, Any]) -> None:
    """``task=causal_lm``'s defaults (in place): a table without named text columns is read
    in TRL's formats (``dataset.text_column=auto``), and the default partitioner (dirichlet,
    a label skew) becomes ``iid``: a language model's data has no labels."""
    from fedrac.data.text import AUTO, is_text

    ds = d["dataset"]
    table = ds.get("name") in ("files", "hub") or ds.get("_target_")
    if d["model"].get("name") == "hf" and table and not is_text(ds):
        ds["text_column"] = AUTO
    part = d["partitioner"]
    if part.get("name") == "dirichlet":
        d["partitioner"] = {"name": "iid", "val_fraction": part.get("val_fraction", 0.0)}


def check_generate_eval(task: Mapping[str, Any]) -> None:
    """``task.generate_eval`` (held-out prompts answered greedily each evaluation): causal_lm
    only, an integer >= 0; ``task.generate_max_new_tokens`` an integer >= 1."""
    n = task.get("generate_eval", 0)
    if task.get("name") != "causal_lm":
        _require(n in (0, None), "task.generate_eval", n, "0 with task="
                 f"{task.get('name')} (generation-based evaluation needs task=causal_lm)")
        return
    _require(_is_int(n) and n >= 0, "task.generate_eval", n,
             "an integer >= 0 (held-out prompts answered each evaluation; 0: off)")
    m = task.get("generate_max_new_tokens", 32)
    _require(_is_int(m) and m >= 1, "task.generate_max_new_tokens", m, "an integer >= 1")


def check_task(d: Mapping[str, Any]) -> None:
    """The task against the model and the data: which pairs can work at all."""
    from fedrac.data.text import is_text
    from fedrac.tasks import TASKS

    name = d["task"].get("name")
    _require(name in TASKS, "task", name, ", ".join(TASKS))
    check_generate_eval(d["task"])
    model, text = d["model"].get("name"), is_text(d["dataset"])
    if name == "causal_lm":
        _require(model == "hf", "task", name, "classification (causal_lm needs model=hf, a "
                 "transformers causal language model)")
        _require(text, "task", name, "classification (causal_lm needs text: a table with "
                 "TRL's columns, or dataset.text_column, or prompt_column and response_column)")
        part = d["partitioner"].get("name")
        _require(part in ("iid", "size_skew", "natural"), "partitioner", part,
                 "iid, size_skew, natural (causal_lm data has no labels to skew)")
    if model == "hf":
        from fedrac.models.hf import check_checkpoint, check_tokenizer

        try:
            if not d["model"].get("config"):  # the path first: a missing one is no tokenizer
                check_checkpoint(d["model"].get("path"))
            check_tokenizer(d["model"])
        except ValueError as err:
            raise ConfigError(str(err)) from err
        _require(text, "dataset.text_column", d["dataset"].get("text_column"),
                 "the text column of a table (model=hf reads text; images and numeric "
                 "features need model=mlp, cnn or vit_tiny)")
        dtype = d["model"].get("dtype", "float32")
        _require(dtype == "float32" or d["strategy"]["name"] != "fedavg", "model.dtype", dtype,
                 "float32 with strategy=fedavg (full fine-tuning keeps every weight and its "
                 "optimizer state in float32; bfloat16/float16 bases need an adapter strategy)")
    elif text:
        _require(False, "model", model, "hf (text needs a transformers model and its "
                 "tokenizer)")
    max_length = d["dataset"].get("max_length")
    if text:
        _require(_is_int(max_length) and max_length > 0, "dataset.max_length", max_length,
                 "an integer > 0 (tokens per example)")



def check_secagg(d: Mapping[str, Any]) -> None:
    """The ``secagg`` group (:func:`fedrac.privacy.secagg.check_config`)."""
    from fedrac.privacy.secagg import check_config

    try:
        check_config(d)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_tune(d: Mapping[str, Any]) -> None:
    """The ``tune`` group (:func:`fedrac.tune.check_tune`)."""
    from fedrac.tune import check_tune as check

    try:
        check(d)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_privacy(d: Mapping[str, Any]) -> None:
    """The ``privacy`` group (:func:`fedrac.privacy.dp.settings_from_config`: noise, clipping,
    a reachable target epsilon, an aggregation rule that keeps the sensitivity bound)."""
    from fedrac.privacy.dp import settings_from_config

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
    _require(d.get("progress", "auto") in ("auto", "bar", "lines"), "progress",
             d.get("progress"), "auto, bar, lines")
    for key in ("verbose", "overwrite"):
        _require(isinstance(d.get(key, False), bool), key, d.get(key), "true, false")
    from fedrac.server.tracking import check_logger

    problem = check_logger(d.get("logger"))
    if problem:
        raise ConfigError(problem)
    fe = d.get("fraction_evaluate", 0.0)
    _require(_is_num(fe) and 0 <= fe <= 1, "fraction_evaluate", fe,
             "a number in [0, 1] (0: no client-side evaluation)")
    mac = d.get("min_available_clients")
    _require(mac is None or (_is_int(mac) and 1 <= mac <= d["num_clients"]),
             "min_available_clients", mac,
             f"null or an integer in 1..num_clients={d['num_clients']}")
    _require(_is_int(d["seed"]) and d["seed"] >= 0, "seed", d["seed"], "an integer >= 0")
    check_device(d["device"], d["engine"].get("name"))
    _require(_is_int(d["eval_every"]) and d["eval_every"] >= 1, "eval_every", d["eval_every"],
             "an integer >= 1")
    me = d.get("monitor_every", 1)
    _require(_is_int(me) and me >= 0, "monitor_every", me, "an integer >= 0 (0: no spectrum.csv)")
    mon = d.get("monitor") or {}
    _require(_is_int(mon.get("top_k", 8)) and mon.get("top_k", 8) >= 1, "monitor.top_k",
             mon.get("top_k"), "an integer >= 1")
    _require(_is_num(mon.get("rank_tol", 1e-3)) and 0 < mon.get("rank_tol", 1e-3) < 1,
             "monitor.rank_tol", mon.get("rank_tol"), "a number in (0, 1)")
    _require(_is_int(mon.get("exact_max", 512)) and mon.get("exact_max", 512) >= 1,
             "monitor.exact_max", mon.get("exact_max"), "an integer >= 1")
    _require(_is_num(d["round_timeout"]) and d["round_timeout"] > 0, "round_timeout",
             d["round_timeout"], "a number of seconds > 0")
    ce = d.get("checkpoint_every", 1)
    _require(_is_int(ce) and ce >= 0, "checkpoint_every", ce,
             "an integer >= 0 (rounds between checkpoints; 0: none)")
    rs = d.get("resume")
    _require(rs is None or (isinstance(rs, str) and rs != ""), "resume", rs,
             "null or the output folder of a run to continue")
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


def check_client(c: Mapping[str, Any], strategy_cls: type | None = None,
                 device: str = "cpu") -> None:
    """The ``client.*`` local training settings (``refactor`` against the strategy,
    ``precision`` against the run's ``device``)."""
    from fedrac.adapters.reflora import REFACTORS
    from fedrac.training.local import OPTIMIZERS, check_precision, resolve_device

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
    from fedrac.training.local import WEIGHT_DECAY_MODES

    mode = c.get("weight_decay_mode", "auto")
    _require(mode in WEIGHT_DECAY_MODES, "client.weight_decay_mode", mode,
             "auto (the optimizer's own: sgd coupled, adamw decoupled), coupled (L2 on the "
             "factors = nuclear-norm penalty), decoupled (AdamW-style)")
    momentum = c.get("momentum", 0.0)
    _require(_is_num(momentum) and 0 <= momentum < 1, "client.momentum", momentum,
             "a number in [0, 1) (sgd only)")
    full_lr = c.get("full_lr")
    _require(full_lr is None or (_is_num(full_lr) and full_lr > 0), "client.full_lr", full_lr,
             "null (use client.lr) or a number > 0")
    warm = c.get("warmup_steps", 0)
    _require(_is_int(warm) and warm >= 0, "client.warmup_steps", warm, "an integer >= 0")
    clip = c.get("max_grad_norm")
    _require(clip is None or (_is_num(clip) and clip > 0), "client.max_grad_norm", clip,
             "null (no clipping) or a number > 0")
    refactor = c.get("refactor", "none")
    _require(refactor in REFACTORS, "client.refactor", refactor, ", ".join(REFACTORS))
    if refactor != "none" and strategy_cls is not None:
        _require(getattr(strategy_cls, "trains_both", False), "client.refactor", refactor,
                 f"none for strategy {strategy_cls.name} (RefLoRA refactors two trained "
                 "factors: fedit, cola, fedex_lora, flora; a shared sketch must not change)")
    projected = c.get("projected_step", False)
    _require(isinstance(projected, bool), "client.projected_step", projected, "true, false")
    if projected and strategy_cls is not None:
        _require(getattr(strategy_cls, "one_factor", False), "client.projected_step", projected,
                 f"false for strategy {strategy_cls.name} (the projected step preconditions one "
                 "trained factor by its sketch: rac_lora, ffa_lora)")
    eps = c.get("refactor_eps", 1e-12)
    _require(_is_num(eps) and eps > 0, "client.refactor_eps", eps, "a number > 0")
    for key, low in (("refactor_interval", 1), ("refactor_warmup_steps", 0)):
        v = c.get(key, low)
        _require(_is_int(v) and v >= low, f"client.{key}", v, f"an integer >= {low}")
    try:  # the device itself was checked by check_run
        check_precision(c.get("precision", "fp32"), c.get("grad_accum_steps", 1),
                        resolve_device(str(device)))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_engine(e: Mapping[str, Any]) -> None:
    """The ``engine`` group."""
    _require(e.get("name") in ("simulation", "inline", "deployment"), "engine",
             e.get("name"), "simulation, inline, deployment")
    threads = e.get("threads")
    _require(threads is None or (_is_int(threads) and threads >= 1), "engine.threads", threads,
             "null or an integer >= 1")
    batched = e.get("batched", False)
    _require(isinstance(batched, bool), "engine.batched", batched, "true, false")
    _require(not batched or e.get("name") == "inline", "engine.batched", batched,
             f"false with engine={e.get('name')} (batched clients need engine=inline)")
    address = e.get("address")
    _require(address is None or (isinstance(address, str) and _ray_address(address)),
             "engine.address", address,
             'null, "auto", host:port of a Ray head (e.g. 10.0.0.5:6379) or ray://host:port')
    resources = e.get("client_resources") or {}
    _require(isinstance(resources, Mapping) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for v in resources.values()), "engine.client_resources", resources,
        "a mapping of Ray resource names to numbers >= 0, e.g. {num_cpus: 1, num_gpus: 0.5}")


def _ray_address(address: str) -> bool:
    """Whether ``address`` is one ``ray.init(address=...)`` takes: auto, host:port, ray://."""
    if address in ("auto", "local"):
        return True
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def check_strategy(s: Mapping[str, Any], strategy_cls: type) -> None:
    """The ``strategy`` group's adapter keys (rank, alpha, sketch, trained factor, download)."""
    from fedrac.adapters.sketch import DISTRIBUTIONS

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
        every = s.get("resample_every", 1)
        _require(_is_int(every) and every >= 1, "strategy.resample_every", every,
                 "an integer >= 1 (a new sketch every k rounds)")
    _require(s.get("client_ranks") is None or s["name"] == "rac_lora", "strategy.client_ranks",
             s.get("client_ranks"), "null (heterogeneous ranks are for strategy=rac_lora only: "
             "nested slices of one shared sketch)")
    from strategies.base import CLIENT_WEIGHTINGS

    tp = s.get("train_factor_p", 0.5)
    _require(_is_num(tp) and 0 <= tp <= 1, "strategy.train_factor_p", tp, "a number in [0, 1]")
    cw = s.get("client_weighting", "examples")
    _require(cw in CLIENT_WEIGHTINGS, "strategy.client_weighting", cw, ", ".join(CLIENT_WEIGHTINGS))
    downloads = getattr(strategy_cls, "DOWNLOADS", ("full",))
    _require(s.get("download", "full") in downloads, "strategy.download", s.get("download"),
             f"{', '.join(downloads)} (for strategy {s['name']})")


def check_guards(d: Mapping[str, Any], strategy_cls: type) -> None:
    """The ``aggregation`` group (robust rules, reply screen) and ``verbose_node_errors``."""
    from strategies.aggregation import check_config

    try:
        check_config(d.get("aggregation") or {}, strategy_cls)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    v = d.get("verbose_node_errors", False)
    _require(isinstance(v, bool), "verbose_node_errors", v, "true, false")


def check_objects(d: Mapping[str, Any], strategy_cls: type) -> None:
    """Build the task, model and partitions once: what only they can tell (shapes, ranks)."""
    from fedrac.adapters import AdapterConfigError, check_rank, find_target_layers
    from fedrac.adapters.quantized import check_quantization, quantization_of
    from fedrac.data import load_splits
    from fedrac.data.partitioners import check_partitions
    from fedrac.models import build_model, check_model

    s = d["strategy"]
    try:
        check_quantization(d["model"], str(d.get("device", "cpu")))
        if quantization_of(d["model"]) != "none" and s["name"] == "fedavg":
            raise ConfigError(f"model.quantization={quantization_of(d['model'])} freezes the base "
                              "weights, which strategy=fedavg trains; allowed with it: an adapter "
                              "strategy, or model.quantization=none")
        splits = load_splits(d["dataset"])
        if d["model"].get("name") == "hf":  # built once: the run takes this instance over
            from fedrac.models.shared import model_as_built

            model, _ = model_as_built(json.dumps([d["model"], d["dataset"]], sort_keys=True,
                                                 default=str))
        else:
            model = build_model(d["model"], splits.input_shape, splits.num_classes)
        check_model(model, d["model"], splits.input_shape, splits.num_classes)
        check_partitions(d["dataset"], d["partitioner"], d["num_clients"], d["seed"])
        layers = find_target_layers(model, d["model"].get("target_modules", ["all"]))
        if d["model"].get("name") == "hf":
            from fedrac.models.export import check_export
            from fedrac.models.hf import trainable_modules

            both = sorted(n for n in layers if any(
                n == m or n.startswith(m + ".")
                for m in trainable_modules(model, d["model"].get("trainable_modules", "auto"))))
            if both:
                raise ConfigError(f"model.target_modules={d['model'].get('target_modules')} "
                                  f"and model.trainable_modules both select {both[:3]}; allowed:"
                                  " a layer is either adapted or trained in full")
            check_export(d, layers)
        if s["name"] != "fedavg":
            check_rank(layers, s["rank"])
        if hasattr(strategy_cls, "validate_config"):
            strategy_cls.validate_config(s)
    except (AdapterConfigError, ValueError) as err:
        raise ConfigError(str(err)) from err
