"""``model=hf``: a Hugging Face ``transformers`` model and its tokenizer.

The model comes from a local checkpoint folder (``model.path``), a hub id (``model.path``,
from the local cache or the network when allowed), or a config with random weights
(``model.config: {model_type: bert, hidden_size: 64, ...}``, for tests). The task picks
the head: ``classification`` -> ``AutoModelForSequenceClassification`` (``num_labels``
from the data), ``causal_lm`` -> ``AutoModelForCausalLM``. The tokenizer comes from
``model.tokenizer`` or the checkpoint folder. The frozen weights are held in
``model.dtype``; the fully trained modules (``model.trainable_modules``, e.g. the new
classifier head) stay float32, as do the LoRA factors and optimizer state.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedrac.adapters.quantized import bnb_config, own_memory, quantized_layers
from fedrac.models.errors import ModelConfigError

log = logging.getLogger(__name__)

AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                "causal_lm": "AutoModelForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_MODULES = ("classifier", "score")  # PEFT's modules_to_save for sequence classification


def quiet_transformers() -> None:
    """transformers' load reports, progress bars and advisory warnings off (errors stay),
    unless ``FEDRAC_VERBOSE`` is set."""
    if os.environ.get("FEDRAC_VERBOSE"):
        return
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass


def _local_dir(path: Any) -> Path | None:
    p = Path(os.path.expanduser(str(path)))
    return p if p.exists() else None


def tokenizer_source(model_cfg: Mapping[str, Any]) -> str | None:
    """Where the tokenizer is read from: ``model.tokenizer``, else ``model.path``."""
    source = model_cfg.get("tokenizer") or model_cfg.get("path")
    return None if source is None else str(source)


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Any:
    """The tokenizer in a folder (or hub id); a padding token is added from EOS if missing."""
    from transformers import AutoTokenizer

    quiet_transformers()
    key = "dataset.tokenizer"
    local = _local_dir(source)
    try:
        tok = AutoTokenizer.from_pretrained(str(local or source))
    except Exception as err:  # noqa: BLE001 - missing files, unknown id, offline
        raise ModelConfigError(
            f"model.tokenizer={source!r} holds no tokenizer ({str(err).splitlines()[0][:160]}); "
            "allowed: a folder with tokenizer files (tokenizer.json / vocab), "
            "e.g. the checkpoint folder, or a hub id in the local cache") from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelConfigError(f"{key}={source!r} has neither a padding nor an EOS token; "
                                   "allowed: a tokenizer with pad_token or eos_token")
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer(model_cfg: Mapping[str, Any]) -> None:
    """A one-line error naming ``model.tokenizer`` unless a tokenizer can be loaded."""
    source = tokenizer_source(model_cfg)
    if source is None:
        raise ModelConfigError("model.tokenizer=None is not set; allowed: a tokenizer folder or "
                               "hub id (needed with model.config, which has no files)")
    try:
        load_tokenizer(source)
    except ModelConfigError as err:
        if model_cfg.get("tokenizer"):
            raise
        reason = str(err).split(" holds no tokenizer ", 1)[-1].split(";", 1)[0]
        raise ModelConfigError(f"model.tokenizer=None: model.path={source!r} holds no tokenizer "
                               f"{reason}; allowed: a tokenizer folder or hub id in "
                               "model.tokenizer") from err


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
ALLOWED_PATHS = ("a checkpoint folder (config.json and weights, from save_pretrained), a "
                 "packaged model (minilm), or a hub id ('org/name')")


def _hub_offline() -> bool:
    """transformers' / huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub would refuse: not cached
        return False


def _hub_reachable(repo: str, timeout: float = 5.0) -> str | None:
    """None when the hub answers for ``repo`` within ``timeout`` s, else why not (one phrase)."""
    try:
        from huggingface_hub import model_info

        model_info(repo, timeout=timeout)
        return None
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: all one line
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}" if str(err) else \
            type(err).__name__


def check_checkpoint(path: Any) -> None:
    """A one-line error unless ``path`` is set and is a checkpoint folder, or a hub id that is
    cached or (online) answered by the hub; offline, an uncached id fails at once."""
    if path is None or str(path).strip() == "":
        raise ModelConfigError(f"model.path={path} is not set; allowed: {ALLOWED_PATHS}, or "
                               "model.config={model_type: ..., ...} for random weights")
    local = _local_dir(path)
    if local is None:
        text = str(path)
        if not HUB_ID.match(text) or text.startswith((".", "~", "/")):
            raise ModelConfigError(f"model.path={text!r} does not exist; allowed: {ALLOWED_PATHS}")
        if _hub_cached(text):
            return
        if _hub_offline():
            raise ModelConfigError(f"model.path={text!r} is neither a folder nor in the local "
                                   "hub cache, and the hub is offline (HF_HUB_OFFLINE); allowed: "
                                   f"{ALLOWED_PATHS} that is cached")
        reason = _hub_reachable(text)
        if reason is not None:
            raise ModelConfigError(f"model.path={text!r} is neither a folder nor in the local "
                                   f"hub cache, and the hub did not answer ({reason}); allowed: "
                                   f"{ALLOWED_PATHS}; offline: HF_HUB_OFFLINE=1")
        return
    if not local.is_dir() or not (local / "config.json").is_file():
        raise ModelConfigError(f"model.path={str(path)!r} is not a transformers checkpoint; "
                               "allowed: a folder with config.json and the weights "
                               "(written by save_pretrained), or a hub id")


def build_hf_model(model_cfg: Mapping[str, Any], num_labels: int) -> nn.Module:
    """The model of a ``model=hf`` config for its ``model.task`` (random weights from
    ``model.config``, else ``from_pretrained(model.path)``); seeded, so every process
    builds the same new head."""
    import transformers

    quiet_transformers()
    task = str(model_cfg.get("task") or "classification")
    if task not in AUTO_CLASSES:
        raise ModelConfigError(f"task={task!r} cannot be served by model=hf; allowed: "
                               f"{', '.join(AUTO_CLASSES)}")
    dtype_name = str(model_cfg.get("dtype") or "float32")
    if dtype_name not in DTYPES:
        raise ModelConfigError(f"model.dtype={dtype_name!r} is not allowed; allowed: "
                               f"{', '.join(DTYPES)}")
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs: dict[str, Any] = {"num_labels": int(num_labels)} if task == "classification" else {}
    quant = bnb_config(model_cfg, DTYPES[dtype_name])
    config = model_cfg.get("config")
    path = model_cfg.get("path")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.get("init_seed") or 0))
        if config:
            config = dict(config)
            model_type = config.pop("model_type", None)
            try:
                hf_config = transformers.AutoConfig.for_model(str(model_type), **config, **kwargs)
                model = auto.from_config(hf_config)
                if quant is not None:  # random weights, then quantised as a checkpoint would be
                    model = _quantized_copy(model, auto, quant, DTYPES[dtype_name])
            except (ValueError, KeyError, TypeError) as err:
                if "Unrecognized configuration class" in str(err):
                    raise ModelConfigError(
                        f"task={task} cannot be served by model.config model_type="
                        f"{model_type!r}: transformers has no {AUTO_CLASSES[task][9:]} for it; "
                        f"allowed: another task or model") from err
                raise ModelConfigError(f"model.config={ {'model_type': model_type, **config} } "
                                       f"cannot build a {AUTO_CLASSES[task]}: "
                                       f"{str(err).splitlines()[0][:200]}") from err
        elif path:
            check_checkpoint(path)
            local = _local_dir(path)
            try:
                if quant is not None:
                    kwargs.update(quantization_config=quant, dtype=DTYPES[dtype_name],
                                  device_map=_quant_device())
                model = auto.from_pretrained(str(local or path), **kwargs)
            except ValueError as err:
                raise ModelConfigError(f"task={task} cannot be served by model.path={path!r}: "
                                       f"transformers has no {AUTO_CLASSES[task][9:]} for it "
                                       f"({str(err).splitlines()[0][:120]}); allowed: another "
                                       "task or model") from err
            except OSError as err:
                raise ModelConfigError(f"model.path={path!r} is not a transformers checkpoint "
                                       f"({str(err).splitlines()[0][:160]}); allowed: a folder "
                                       "with config.json and weights, or a cached hub id") from err
        else:
            raise ModelConfigError("model.path=None is not set; allowed: a checkpoint folder or "
                                   "hub id, or model.config={model_type: ..., ...} for random "
                                   "weights")
    source = tokenizer_source(model_cfg)
    if source is not None:
        tok = load_tokenizer(source)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    if task == "causal_lm" and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if quant is None:
        model.to(DTYPES[dtype_name])
    else:
        quantized_layers(model)
        own_memory(model)  # drop the mapped checkpoint the quantisation read
    for module in trainable_modules(model, model_cfg.get("trainable_modules", "auto")).values():
        module.float()
        if dtype_name != "float32":  # a float32 module fed by the bfloat16/float16 base
            module.register_forward_pre_hook(_inputs_to_float32)
    if model_cfg.get("gradient_checkpointing"):
        enable = getattr(model, "activation_checkpointing_enable", None) or \
            model.gradient_checkpointing_enable
        enable(**{("activation_checkpointing_kwargs" if enable.__name__.startswith("activation")
                   else "gradient_checkpointing_kwargs"): {"use_reentrant": False}})
    return model


def _quant_device() -> str:
    """Where bitsandbytes quantises the base: the first CUDA device, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _quantized_copy(model: nn.Module, auto: Any, quant: Any, dtype: torch.dtype) -> nn.Module:
    """``model`` (random weights) saved and loaded again through ``quant``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedrac-quant-") as tmp:
        model.save_pretrained(tmp)
        return auto.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                    device_map=_quant_device())


def _inputs_to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def trainable_modules(model: nn.Module, patterns: Any) -> dict[str, nn.Module]:
    """The modules trained in full beside the adapters (PEFT's ``modules_to_save``).

    ``auto``: the new head of a sequence classification model (``classifier`` or
    ``score``), nothing otherwise; or a list of module names / dotted suffixes.
    """
    from fedrac.adapters.model import _matches

    if patterns in (None, "none", []):
        return {}
    if patterns == "auto" or patterns == ["auto"]:
        if not type(model).__name__.endswith("ForSequenceClassification"):
            return {}
        patterns = list(HEAD_MODULES)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and any(_matches(name, p) for p in patterns) and \
                not any(name.startswith(f + ".") for f in found):
            found[name] = module
    return found


def check_hf_model(model: nn.Module, model_cfg: Mapping[str, Any]) -> None:
    """The checks only the built model can answer: trainable modules exist and are apart
    from the LoRA targets."""
    patterns = model_cfg.get("trainable_modules", "auto")
    found = trainable_modules(model, patterns)
    if patterns not in ("auto", ["auto"], None, "none", []) and not found:
        names = sorted({n.split(".")[-1] for n, _ in model.named_children()})
        raise ModelConfigError(f"model.trainable_modules={patterns} matches no module; "
                               f"allowed: module names such as {names}")
