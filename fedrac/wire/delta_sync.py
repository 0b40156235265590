"""Adapter-sized downloads: the merges both sides run, weight checksums, delta records.

A round's global change is small for every adapter method: Fed-RAC-LoRA's / FFA-LoRA's is
its seed and the averaged trained factors; Fed-SB's the averaged middle factors ``R`` (the
node holds the run's fixed ``B`` and ``A``); COLA's merge, FLoRA's stacked factors and
FedEx-LoRA's residual are an ``update`` record (stacked factors ``<layer>.stack_B`` /
``<layer>.stack_A``, or dense ``<layer>.weight`` deltas); trained modules (a new classifier
head) are their new values. A client that keeps the global weights ``W_v`` (after round
``v``) rebuilds ``W_{t-1}`` by replaying the changes of rounds ``v+1 .. t-1`` with
:func:`apply_change` -- the very functions the server merges with -- so on the CPU the
rebuilt weights are bit-identical; a checksum of the result confirms it.

Wire format (``strategy.download=delta``): a ``deltas`` ArrayRecord whose keys are
``"<round>/<key>"``, ``<key>`` one of ``<layer>.lora_<side>`` (an averaged trained factor,
merged against the sketch of the round's seed), ``<layer>.lora_R`` (Fed-SB's averaged middle
factor, merged between the run's fixed ``B`` and ``A``: :func:`merge_middle`),
``<layer>.stack_B`` / ``<layer>.stack_A`` or ``<layer>.weight`` (an update record,
:func:`apply_update`) and ``set:<key>`` (the new value of a trained module's tensor
``<key>``); a ``sync`` ConfigRecord with ``base`` (the version
the client must hold), ``rounds`` and ``seeds`` (the replayed rounds and their sketch seeds)
and ``checksum`` (:func:`sync_checksum` of what the node will train from: the weights
rebuilt, ``W_{t-1}`` at round ``t``, and the round's whole train config); its ``config``
record holds only ``server-round`` and what changed, the rest of the (constant) train config
being cached with the weights -- so a node whose cached config differs (an edited ``lr`` or
``local-epochs``) resyncs instead of training with it. A full download carries ``arrays``,
the whole ``config`` and a ``sync`` record with ``target`` and ``checksum``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from fedrac.adapters import LayerSpec
from fedrac.adapters.sketch import make_sketch
from fedrac.models.weights import state_digest

STATE_WEIGHTS = "fedrac.weights"  # node Context.state keys of the cached global weights
STATE_SYNC = "fedrac.sync"        # ... of its version (``{"version": v}``)
STATE_CONFIG = "fedrac.config"    # ... and of the static part of the train config
SET_PREFIX = "set:"  # a round-change key ``set:<key>``: tensor ``<key>`` takes this value


class ResyncNeeded(RuntimeError):
    """The client cannot rebuild the global weights from its cache and the deltas."""


def weights_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-digit hash of the state dict's keys, dtypes, shapes and raw bytes."""
    return state_digest(state)[:16]


def config_checksum(config: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of a train config's keys and typed values (``1`` != ``1.0``)."""
    def typed(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return [typed(x) for x in v]
        if isinstance(v, bytes):
            return ["bytes", v.hex()]
        return [type(v).__name__, v]

    text = json.dumps({str(k): typed(v) for k, v in config.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sync_checksum(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """The checksum a delta download carries: the weights' and the train config's, hashed
    together (16 hex digits)."""
    both = f"{weights_checksum(state)}|{config_checksum(config)}"
    return hashlib.sha256(both.encode()).hexdigest()[:16]


def merge_factors(
    state: Mapping[str, torch.Tensor], layers: Mapping[str, LayerSpec],
    factors: Mapping[str, torch.Tensor], sketches: Mapping[str, torch.Tensor], scale: float,
) -> dict[str, torch.Tensor]:
    """``W <- W + s * B @ A`` per layer (float64), one factor from ``factors``, one sketch.

    ``factors`` and ``sketches`` are keyed ``"<layer>.lora_A"`` / ``"<layer>.lora_B"``;
    each layer takes ``A`` and ``B`` from whichever of the two holds it. Returns a new
    state dict; tensors of other keys are shared with ``state``.
    """
    out = dict(state)
    for name, spec in layers.items():
        pair = []
        for side in ("A", "B"):
            key = f"{name}.lora_{side}"
            pair.append(factors[key] if key in factors else sketches[key])
        a, b = pair
        w = out[spec.weight_key]
        out[spec.weight_key] = (w.to(torch.float64) + spec.delta(
            a.to(torch.float64), b.to(torch.float64), scale)).to(w.dtype)
    return out


def merge_middle(
    state: Mapping[str, torch.Tensor], layers: Mapping[str, LayerSpec],
    frame: Mapping[str, torch.Tensor], middles: Mapping[str, torch.Tensor], scale: float,
) -> dict[str, torch.Tensor]:
    """``W <- W + s * B @ R @ A`` per layer (float64): ``R`` from ``middles``
    (``"<layer>.lora_R"``), the fixed ``B``, ``A`` from ``frame`` (``"<layer>.lora_B"`` /
    ``"<layer>.lora_A"``). Returns a new state dict; tensors of other keys are shared."""
    out = dict(state)
    for name, spec in layers.items():
        br = frame[f"{name}.lora_B"].to(torch.float64) @ \
            middles[f"{name}.lora_R"].to(torch.float64)
        delta = spec.delta(frame[f"{name}.lora_A"].to(torch.float64), br, scale)
        w = out[spec.weight_key]
        out[spec.weight_key] = (w.to(torch.float64) + delta).to(w.dtype)
    return out


def round_sketches(
    layers: Mapping[str, LayerSpec], factor_keys: set[str], seed: int, rank: int,
    distribution: str,
) -> dict[str, torch.Tensor]:
    """The sketches of a round: per layer the factor not in ``factor_keys``, from ``seed``."""
    sketches = {}
    for name, spec in layers.items():
        for side in ("A", "B"):
            key = f"{name}.lora_{side}"
            if key not in factor_keys:
                sketches[key] = make_sketch(seed, key, spec.factor_shape(side, rank),
                                            distribution)
    return sketches


def apply_update(
    state: dict[str, torch.Tensor], update: Mapping[str, torch.Tensor],
    layers: Mapping[str, LayerSpec] | None = None,
) -> dict[str, torch.Tensor]:
    """``state`` (changed in place and returned) plus an update record: dense
    ``<layer>.weight`` deltas (added in the weight's dtype) or stacked ``<layer>.stack_B`` /
    ``<layer>.stack_A`` factors whose product is the delta (float64, then cast back);
    ``layers`` says which weights are stored transposed (transformers' ``Conv1D``)."""
    for key, value in update.items():
        if key.endswith(".weight"):
            state[key] = state[key] + value.to(state[key].dtype)
        elif key.endswith(".stack_B"):
            layer = key[: -len(".stack_B")]
            w = state[f"{layer}.weight"]
            delta = value.to(torch.float64) @ update[f"{layer}.stack_A"].to(torch.float64)
            if layers is not None and layer in layers and layers[layer].transposed:
                delta = delta.T
            state[f"{layer}.weight"] = (w.to(torch.float64) + delta.reshape(w.shape)).to(w.dtype)
        elif not key.endswith(".stack_A"):
            raise KeyError(f"update record key {key!r} is not '<layer>.weight' or a stack factor")
    return state


def is_factor_key(key: str) -> bool:
    """Whether a round-change key is an averaged trained factor (``<layer>.lora_A|B``)."""
    return key.endswith((".lora_A", ".lora_B"))


def is_middle_key(key: str) -> bool:
    """Whether a round-change key is Fed-SB's averaged middle factor (``<layer>.lora_R``)."""
    return key.endswith(".lora_R")


def apply_change(
    state: Mapping[str, torch.Tensor], layers: Mapping[str, LayerSpec],
    change: Mapping[str, torch.Tensor], seed: int, rank: int, alpha: float,
    distribution: str | None, frame: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One round's change replayed on ``state`` (a new dict; ``state``'s tensors are not
    modified): the factor merge (sketches from ``seed``) or the middle-factor merge
    (``frame``: the fixed ``B``, ``A``), then the update record, then the new values of the
    trained modules -- the order the server applies them in."""
    factors = {k: v for k, v in change.items() if is_factor_key(k)}
    middles = {k: v for k, v in change.items() if is_middle_key(k)}
    update = {k: v for k, v in change.items() if not is_factor_key(k)
              and not is_middle_key(k) and not k.startswith(SET_PREFIX)}
    out = dict(state)
    if middles:
        if set(middles) != {f"{n}.lora_R" for n in layers}:
            raise ResyncNeeded("deltas do not hold one middle factor R per layer")
        if frame is None or any(f"{n}.lora_{s}" not in frame for n in layers for s in "AB"):
            raise ResyncNeeded("deltas hold middle factors R but this node holds no B, A")
        out = merge_middle(out, layers, frame, middles, alpha / rank)
    if factors:
        per_layer = [sum(f"{n}.lora_{s}" in factors for s in "AB") for n in layers]
        if len(factors) != len(layers) or any(c != 1 for c in per_layer):
            raise ResyncNeeded("deltas do not hold one factor per layer")
        if distribution is None:
            raise ResyncNeeded("deltas hold factors but the message names no sketch")
        sketches = round_sketches(layers, set(factors), seed, rank, distribution)
        out = merge_factors(out, layers, factors, sketches, alpha / rank)
    try:
        out = apply_update(out, update, layers)
    except KeyError as err:
        raise ResyncNeeded(f"unusable update in the deltas: {err}") from err
    for key, value in change.items():
        if key.startswith(SET_PREFIX):
            name = key[len(SET_PREFIX):]
            if name not in out:
                raise ResyncNeeded(f"delta '{key}' names no tensor of the model")
            out[name] = value.to(out[name].dtype)
    return out


def apply_deltas(
    state: Mapping[str, torch.Tensor], layers: Mapping[str, LayerSpec],
    deltas: Mapping[str, torch.Tensor], rounds: list[int], seeds: list[int], rank: int,
    alpha: float, distribution: str | None, frame: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Replay the changes of ``rounds`` (with their ``seeds``; ``frame``: Fed-SB's fixed
    ``B``, ``A``) on ``state``, in order."""
    if len(rounds) != len(seeds):
        raise ResyncNeeded(f"sync record has {len(rounds)} rounds but {len(seeds)} seeds")
    by_round: dict[int, dict[str, torch.Tensor]] = {int(r): {} for r in rounds}
    for key, tensor in deltas.items():
        head, _, change_key = key.partition("/")
        if not head.isdigit() or int(head) not in by_round:
            raise ResyncNeeded(f"delta '{key}' names no round of the sync record")
        by_round[int(head)][change_key] = tensor
    for rnd, seed in zip(rounds, seeds, strict=True):
        try:
            state = apply_change(state, layers, by_round[int(rnd)], int(seed), rank, alpha,
                                 distribution, frame)
        except ResyncNeeded as err:
            raise ResyncNeeded(f"round {rnd}: {err}") from err
    return dict(state)
