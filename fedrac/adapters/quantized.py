"""4-bit and 8-bit frozen bases (``model.quantization: none | nf4 | int8``), QLoRA style.

The model is loaded through transformers' ``BitsAndBytesConfig`` (bitsandbytes' ``Linear4bit``
with NF4, or ``Linear8bitLt``); LoRA runs on the forward path on top of the quantised layers
(:mod:`fedrac.adapters.layer`). The server's global weights stay dense (float32, the merge
``W += s B̄ A`` stays exact); each time a process loads global weights into its quantised
model, the quantised layers are quantised again from them (:func:`load_state`), so a client
trains its adapter on ``Q(W_t)`` -- QLoRA on the current global model -- and the server's
starting weights are the dequantised base ``deQ(Q(W_0))`` (:func:`dense_state`).
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "int8")


class QuantizationError(ValueError):
    """A quantisation the model or the installed bitsandbytes cannot serve (names the key)."""


def quantization_of(model_cfg: Mapping[str, Any]) -> str:
    """``model.quantization`` of a model config (``none`` when unset)."""
    return str(model_cfg.get("quantization") or "none")


def check_quantization(model_cfg: Mapping[str, Any], device: str) -> None:
    """Raise unless ``model.quantization`` can be served: a known value, ``model=hf``, and a
    bitsandbytes that runs its layer on ``device`` (probed on a tiny layer)."""
    name = quantization_of(model_cfg)
    if name not in QUANTIZATIONS:
        raise QuantizationError(f"model.quantization={name!r} is not allowed; allowed: "
                                f"{', '.join(QUANTIZATIONS)}")
    if name == "none":
        return
    if model_cfg.get("name") != "hf" or model_cfg.get("_target_"):
        raise QuantizationError(f"model.quantization={name} needs model=hf (a transformers "
                                f"model); allowed with model={model_cfg.get('name')}: none")
    try:
        _probe(name, device)
    except Exception as err:  # noqa: BLE001 - missing package, no kernel for the device
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise QuantizationError(f"model.quantization={name} cannot run on device={device} with "
                                f"the installed bitsandbytes ({first}); allowed here: none"
                                ) from err


def _probe(name: str, device: str) -> None:
    import bitsandbytes as bnb

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    w = torch.randn(64, 64)
    if name == "nf4":
        layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4",
                                  compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    layer = layer.to(dev)
    x = torch.randn(2, 64, device=dev, requires_grad=True)
    layer(x).sum().backward()


def bnb_config(model_cfg: Mapping[str, Any], compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (``None`` for none)."""
    name = quantization_of(model_cfg)
    if name == "none":
        return None
    from transformers import BitsAndBytesConfig

    if name == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=False)
    return BitsAndBytesConfig(load_in_8bit=True)


def _kind(module: nn.Module) -> str | None:
    """``nf4`` / ``int8`` for bitsandbytes' quantised linear layers, else ``None``."""
    name = type(module).__name__
    if name == "Linear4bit":
        return "nf4"
    if name == "Linear8bitLt":
        return "int8"
    return None


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's quantised layers by name, with bitsandbytes' repacking of 4-bit weights for
    its bf16 CPU inference kernel switched off: fedrac reads and rewrites those weights, and
    that kernel has no backward (after one evaluation, training would get no gradient through
    the base layers; bitsandbytes 0.50 on an AVX512-BF16 CPU)."""
    layers = {n: m for n, m in model.named_modules() if _kind(m)}
    for module in layers.values():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return layers


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """A quantised layer's weight as float32 ``d_out x d_in``."""
    import bitsandbytes.functional as bf

    w = module.weight
    if _kind(module) == "nf4":
        return bf.dequantize_4bit(w.data, w.quant_state).float().reshape(
            module.out_features, module.in_features)
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    cb = w.CB if getattr(w, "CB", None) is not None else w.data
    return cb.float() * scb.float()[:, None] / 127.0


@torch.no_grad()
def _requantize(module: nn.Module, dense: torch.Tensor) -> None:
    import bitsandbytes.functional as bf

    w = module.weight
    device = w.device
    if _kind(module) == "nf4":
        packed, state = bf.quantize_4bit(
            dense.to(device=device, dtype=w.quant_state.dtype),
            blocksize=w.quant_state.blocksize, quant_type=w.quant_type,
            quant_storage=w.quant_storage)
        w.data = packed
        w.quant_state = state
        return
    cb, scb, _ = bf.int8_vectorwise_quant(dense.to(device=device, dtype=torch.float16))
    w.data = cb
    w.CB, w.SCB = cb, scb
    if getattr(module, "state", None) is not None:
        module.state.CB, module.state.SCB = cb, scb


TRIM_BYTES = 128 << 20  # requantising hands freed memory back after about this much weight


def trim_heap() -> None:
    """Hand the heap's freed pages back to the operating system (glibc's ``malloc_trim``;
    nothing elsewhere). Quantising a model, or loading a checkpoint, frees hundreds of MB of
    temporaries that glibc otherwise keeps in the process's resident memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _extra_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the quantised layers (weights, quantisation state, biases)."""
    prefixes = tuple(f"{n}." for n in quantized_layers(model))
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def dense_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()``'s items with every quantised weight dequantised (float32
    ``weight``, no quantisation state), one layer at a time: the dense weights are never all
    in memory at once unless the caller keeps them."""
    layers = quantized_layers(model)
    extra = _extra_keys(model) if layers else set()
    for k, v in model.state_dict().items():
        if k not in extra:
            yield k, v
    for name, module in layers.items():
        yield f"{name}.weight", dequantize(module).cpu()
        if module.bias is not None:
            yield f"{name}.bias", module.bias.detach()


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every quantised weight dequantised (:func:`dense_items`):
    what the server keeps and merges into."""
    return dict(dense_items(model))


@torch.no_grad()
def own_memory(model: nn.Module) -> None:
    """Give a quantised model's unquantised tensors (embeddings, norms, head) memory of their
    own. transformers leaves them as views of the memory-mapped checkpoint, and while one view
    lives the whole file stays mapped: every page the quantisation read (the full dense
    checkpoint) stays in the process's resident memory."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and not (name == "weight" and _kind(module)):
                p.data = p.data.clone()
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.clone()
    trim_heap()


def _holds(module: nn.Module, dense: torch.Tensor) -> bool:
    """Whether ``module`` was last quantised from a tensor that is unchanged since (its
    version counter) and is ``dense`` or equal to it: loading the same weights again (the
    server's evaluation, then a client of the same process, which rebuilt the same weights
    from its cache and the deltas) skips the requantising."""
    source = getattr(module, "_fedrac_source", None)
    held = source[0]() if source is not None else None
    if held is None or held._version != source[1]:
        return False
    return held is dense or (held.shape == dense.shape and held.dtype == dense.dtype
                             and held.device == dense.device and torch.equal(held, dense))


def _dequantizes_to(module: nn.Module, dense: torch.Tensor) -> bool:
    """Whether ``dense`` (float32, on the layer's device) is exactly what the layer
    dequantises to: then its codes are already ``Q(dense)`` (``Q(deQ(Q(W))) == Q(W)``,
    tested), as for the server's ``W0``, the dequantised base, loaded into the freshly built
    model. A check costs about 1 % of a requantising."""
    return tuple(dense.shape) == (module.out_features, module.in_features) and torch.equal(
        dequantize(module), dense)


@torch.no_grad()
def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)``; a quantised model's quantised layers are
    quantised again from the dense ``<layer>.weight`` in ``state``, unless their codes already
    are its quantisation (the tensor they were last quantised from, unchanged, or exactly
    what they dequantise to)."""
    layers = quantized_layers(model)
    if not layers:
        model.load_state_dict(state, strict=True)
        return
    prefixes = tuple(f"{n}." for n in layers)
    rest = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    result = model.load_state_dict(rest, strict=False)
    missing = set(result.missing_keys) - _extra_keys(model)
    own = {f"{n}.{p}" for n, m in layers.items() for p in ("weight", "bias")
           if getattr(m, p, None) is not None}
    unexpected = [*result.unexpected_keys,
                  *(k for k in state if k.startswith(prefixes) and k not in own)]
    missing |= own - set(state)
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {sorted(missing)[:4]}, "
                       f"unexpected {sorted(unexpected)[:4]}")
    since_trim = 0
    for name, module in layers.items():
        dense = state[f"{name}.weight"]
        if not _holds(module, dense):
            here = dense.to(device=module.weight.device, dtype=torch.float32)  # moved once
            if not _dequantizes_to(module, here):  # else: its codes already are Q(dense)
                _requantize(module, here)
                since_trim += dense.numel() * 4
            del here
        module._fedrac_source = (weakref.ref(dense), dense._version)
        if module.bias is not None:
            module.bias.copy_(state[f"{name}.bias"])
        if since_trim >= TRIM_BYTES:  # glibc keeps each layer's freed temporaries resident
            trim_heap()
            since_trim = 0
    trim_heap()  # the replaced 4/8-bit weights and the quantisation temporaries
