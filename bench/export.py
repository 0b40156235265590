"""Seconds to compute ``adapter/`` from the run's factors against the dense SVD of ``W - W0``.

A synthetic RAC-LoRA chain of the issue-19 workload's layer shapes (LLaMA, hidden 1536,
intermediate 4096, 4 layers, all seven projections: 28 layers), rank 8, over ``rounds``
merges, recorded as the strategies record them (:class:`MergedFactors`). The factor path
(QR of the stacks and a small SVD per layer, :func:`adapter_factors_of` with ``auto``) runs on
all 28 layers; the dense SVD on one layer of each shape, scaled to the 28 (``--quick``: one
round and one dense layer). One torch thread. ``python -m bench.export [--quick]``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from fedrac.adapters import LayerSpec
from fedrac.models.export import adapter_factors_of
from fedrac.models.merged_factors import MergedFactors

HIDDEN, INTER, BLOCKS, RANK = 1536, 4096, 4, 8
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}


def workload_layers() -> dict[str, LayerSpec]:
    """The 28 target layers of the workload."""
    return {f"model.layers.{i}.{n}": LayerSpec(f"model.layers.{i}.{n}", shape)
            for i in range(BLOCKS) for n, shape in SHAPES.items()}


def chain(layers: dict[str, LayerSpec], rounds: int) -> MergedFactors:
    """``rounds`` rank-``RANK`` merges per layer, as RAC-LoRA records them."""
    gen = torch.Generator().manual_seed(0)
    merged = MergedFactors(layers)
    for _ in range(rounds):
        for name, spec in layers.items():
            merged.add(name, 1e-3 * torch.randn(spec.d_out, RANK, generator=gen),
                       torch.randn(RANK, spec.d_in, generator=gen) / spec.d_in ** 0.5)
    return merged


def export_times(rounds: int, dense_layers: int = 2) -> dict[str, Any]:
    """Seconds of the factor path (all layers) and of the dense SVD (on ``dense_layers``
    shapes, scaled to all layers; 0: not timed, ``nan``)."""
    layers = workload_layers()
    merged = chain(layers, rounds)
    t0 = time.perf_counter()
    factors, rel, _ = adapter_factors_of(layers, {}, {}, "auto", merged)
    fast = time.perf_counter() - t0
    ranks = sorted({int(a.shape[0]) for a, _ in factors.values()})
    picked = {}
    for name, spec in layers.items():  # one layer per shape
        picked.setdefault(spec.weight_shape, name)
    picked = dict(list(picked.items())[:dense_layers])
    dense = 0.0
    for shape, name in picked.items():
        b, a = merged.stacks(name)
        delta = b.double() @ a.double()
        t0 = time.perf_counter()
        torch.linalg.svd(delta, full_matrices=False)
        count = sum(1 for s in layers.values() if s.weight_shape == shape)
        dense += (time.perf_counter() - t0) * count
    covered = sum(sum(1 for s in layers.values() if s.weight_shape == shape) for shape in picked)
    dense = dense * len(layers) / covered if covered else float("nan")
    return {"rounds": rounds, "layers": len(layers), "ranks": ranks, "factor_seconds": fast,
            "dense_seconds_est": dense, "speedup": dense / fast, "relative_error": rel}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    quick = "--quick" in argv
    for rounds in ((1,) if quick else (1, 10, 50)):
        row = export_times(rounds, 1 if quick else 2)
        print(f"adapter/ of a rank-{RANK} chain, {row['rounds']} rounds, {row['layers']} layers "
              f"(ranks {row['ranks']}): from factors {row['factor_seconds']:.2f} s, dense SVD "
              f"~{row['dense_seconds_est']:.1f} s ({row['speedup']:.0f}x), relative error "
              f"{row['relative_error']:.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
