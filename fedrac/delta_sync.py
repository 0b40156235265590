"""Seed-sized downloads: the merge both sides run, weight checksums, delta records.

Fed-RAC-LoRA's global update of round ``t`` is fully described by its seed and the
averaged trained factors. A client that keeps the global weights ``W_v`` (after round
``v``) rebuilds ``W_{t-1}`` by replaying the merges of rounds ``v+1 .. t-1`` with
:func:`merge_factors` -- the very function the server merges with -- so on the CPU the
rebuilt weights are bit-identical; a checksum of the result confirms it.

Wire format (``strategy.download=delta``): a ``deltas`` ArrayRecord whose keys are
``"<round>/<layer>.lora_<side>"`` (the averaged trained factor of that round) and a
``sync`` ConfigRecord with ``base`` (the version the client must hold), ``rounds`` and
``seeds`` (the merged rounds and their sketch seeds) and ``checksum``
(:func:`sync_checksum` of what the node will train from: the weights rebuilt, ``W_{t-1}``
at round ``t``, and the round's whole train config); its ``config`` record holds only
``server-round`` and what changed, the rest of the (constant) train config being cached
with the weights -- so a node whose cached config differs (an edited ``lr`` or
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
from fedrac.models.weights import state_digest
from fedrac.sketch import make_sketch

STATE_WEIGHTS = "fedrac.weights"  # node Context.state keys of the cached global weights
STATE_SYNC = "fedrac.sync"        # ... of its version (``{"version": v}``)
STATE_CONFIG = "fedrac.config"    # ... and of the static part of the train config


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


def apply_deltas(
    state: Mapping[str, torch.Tensor], layers: Mapping[str, LayerSpec],
    deltas: Mapping[str, torch.Tensor], rounds: list[int], seeds: list[int], rank: int,
    alpha: float, distribution: str,
) -> dict[str, torch.Tensor]:
    """Replay the merges of ``rounds`` (with their ``seeds``) on ``state``, in order."""
    if len(rounds) != len(seeds):
        raise ResyncNeeded(f"sync record has {len(rounds)} rounds but {len(seeds)} seeds")
    by_round: dict[int, dict[str, torch.Tensor]] = {int(r): {} for r in rounds}
    for key, tensor in deltas.items():
        head, _, factor_key = key.partition("/")
        if not head.isdigit() or int(head) not in by_round:
            raise ResyncNeeded(f"delta '{key}' names no round of the sync record")
        by_round[int(head)][factor_key] = tensor
    for rnd, seed in zip(rounds, seeds, strict=True):
        factors = by_round[int(rnd)]
        per_layer = [sum(f"{n}.lora_{s}" in factors for s in "AB") for n in layers]
        if len(factors) != len(layers) or any(c != 1 for c in per_layer):
            raise ResyncNeeded(f"round {rnd}: deltas do not hold one factor per layer")
        sketches = round_sketches(layers, set(factors), int(seed), rank, distribution)
        state = merge_factors(state, layers, factors, sketches, alpha / rank)
    return dict(state)
