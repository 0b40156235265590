"""The one model instance a process keeps for a (model, dataset) config.

Every simulated client of a process and the server's evaluation load weights into it
(:func:`shared_model`); the server's starting weights are read from it too while it still
holds the weights it was built with (:func:`model_as_built`), so a transformer is built once
per process, not twice.
"""

from __future__ import annotations

import json

from torch import nn

from fedrac.settings.typed import ModelSettings, Settings

_cache: dict[str, nn.Module] = {}  # at most one entry: the config this process serves
_handed_out: set[str] = set()
_config_keys: dict[int, tuple[Settings, str]] = {}


def _build(key: str) -> nn.Module:
    from fedrac.adapters.quantized import trim_heap
    from fedrac.data import load_splits
    from fedrac.models import build_model

    model_cfg, dataset_cfg = json.loads(key)
    splits = load_splits(dataset_cfg)
    model = build_model(model_cfg, splits.input_shape, splits.num_classes)
    trim_heap()  # loading a checkpoint (and quantising it) leaves freed temporaries resident
    return model


def _get(key: str) -> nn.Module:
    if key not in _cache:
        cache_clear()
        _cache[key] = _build(key)
    return _cache[key]


def shared_model(key: str) -> nn.Module:
    """The process's model for ``key`` (``json.dumps([model_cfg, dataset_cfg])``), built once;
    its weights are the caller's to overwrite."""
    model = _get(key)
    _handed_out.add(key)
    return model


def model_as_built(key: str) -> tuple[nn.Module, bool]:
    """``(model, shared)``: the shared model while no one has been handed it (its weights are
    those it was built with), else a new model that is not kept (``shared`` False)."""
    if key in _cache and key in _handed_out:
        return _build(key), False
    return _get(key), True


def config_key(settings: Settings) -> str:
    """The key of a run's model (``json.dumps([model_cfg, dataset_cfg])``), computed once
    per settings object."""
    entry = _config_keys.get(id(settings))
    if entry is None or entry[0] is not settings:
        if len(_config_keys) > 16:
            _config_keys.clear()
        entry = (settings, json.dumps((settings.model.options, settings.data.dataset),
                                      sort_keys=True, default=str))
        _config_keys[id(settings)] = entry  # holds it, so its id is not reused while cached
    return entry[1]


def config_model(settings: Settings) -> nn.Module:
    """This process's model instance for a run's settings (built once; weights are loaded per
    message).

    One instance serves every simulated client of the process, and the server's evaluation
    when it runs in the same process: a transformer's base weights are held once.
    """
    return shared_model(config_key(settings))


def module_keys(model: nn.Module, settings: ModelSettings) -> dict[str, nn.Parameter]:
    """The parameters of ``model.trainable_modules`` by state-dict key (none for built-in
    models): what an adapter method trains in full beside the adapters."""
    if settings.name != "hf":
        return {}
    from fedrac.models.hf import trainable_modules

    found = trainable_modules(model, settings.options.get("trainable_modules", "auto"))
    return {f"{name}.{key}": p for name, module in found.items()
            for key, p in module.named_parameters()}


def cache_clear() -> None:
    """Forget the kept model."""
    _cache.clear()
    _handed_out.clear()


shared_model.cache_clear = cache_clear  # type: ignore[attr-defined]  # as functools' caches
