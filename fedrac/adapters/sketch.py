"""Seeded random sketches: the frozen low-rank factor every client regenerates.

A sketch is a pure function of ``(round_seed, layer_name, shape, distribution)``.
It is generated on the CPU with an explicit ``torch.Generator`` (never the global
RNG, never on CUDA, whose streams differ), so every process draws the same bits.
The unit-norm distributions satisfy ``E[H] = (r/k) I`` where ``k`` is the sketch's long
side; ``normal`` (N(0, 1) entries: the official RAC-LoRA code's sketch, which with
``strategy.alpha = alpha * rank`` also has its scale ``s = alpha``) gives ``r I`` and
``kaiming_uniform`` (PEFT's initialisation of ``lora_A``, ``kaiming_uniform_(a=sqrt(5))``:
entries ``U(-1/sqrt(k), 1/sqrt(k))``, FFA-LoRA's frozen factor) ``r/(3k) I``
(:func:`expected_projection`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping

import numpy as np
import torch

DISTRIBUTIONS = ("gaussian", "orthogonal", "rademacher", "coordinate", "normal",
                 "kaiming_uniform")


def expected_projection(distribution: str, r: int, k: int) -> float:
    """``c`` in ``E[H] = c I`` (``H = S^T S`` for an ``r x k`` sketch, ``S S^T`` for ``k x r``)."""
    return {"normal": float(r), "kaiming_uniform": r / (3 * k)}.get(distribution, r / k)


class SketchMismatchError(RuntimeError):
    """A client regenerated a sketch whose fingerprint differs from the server's."""


def derive_seed(run_seed: int, *path: int) -> int:
    """A 63-bit seed derived from ``(run_seed, *path)``, e.g. ``(run_seed, round)``.

    Stateless: the same inputs give the same seed in any process, so a resumed run
    draws the same seeds. Injective in the tuple (up to a 2^-63 hash collision): the
    tuple's length and every integer in full are hashed, so ``(0, 5)``, ``(0, 5, 0)`` and
    ``(2**32,)`` vs ``(0, 1)`` differ (NumPy's ``SeedSequence`` ignores trailing zeros and
    splits big integers into 32-bit words).
    """
    parts = [int(run_seed), *(int(p) for p in path)]
    text = f"fedrac.derive_seed:{len(parts)}:" + ",".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _layer_seed(round_seed: int, layer_name: str) -> int:
    digest = hashlib.sha256(f"{int(round_seed)}:{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_sketch(
    round_seed: int,
    layer_name: str,
    shape: tuple[int, int],
    distribution: str = "orthogonal",
) -> torch.Tensor:
    """The sketch of ``shape`` (rows, cols) for one layer and round, float32 on the CPU.

    The short side is the rank ``r``; the long side ``k`` gets the unit-norm
    directions (rows of an ``A``-shaped ``r x d_in`` sketch, columns of a
    ``B``-shaped ``d_out x r`` one).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"strategy.sketch={distribution!r} is not a sketch distribution; "
            f"allowed: {', '.join(DISTRIBUTIONS)}"
        )
    shape2 = (int(shape[0]), int(shape[1]))
    return _make_sketch(int(round_seed), layer_name, shape2, distribution).clone()


@functools.lru_cache(maxsize=256)
def _make_sketch(
    round_seed: int, layer_name: str, shape: tuple[int, int], distribution: str
) -> torch.Tensor:
    """Cached per process: the clients of one round that share a process draw it once."""
    rows, cols = shape
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_layer_seed(round_seed, layer_name))
    wide = rows <= cols  # A-shaped: r x k
    r, k = (rows, cols) if wide else (cols, rows)
    if distribution == "gaussian":
        s = torch.randn(r, k, generator=gen, dtype=torch.float64) / np.sqrt(k)
    elif distribution == "rademacher":
        s = (torch.randint(0, 2, (r, k), generator=gen).to(torch.float64) * 2 - 1) / np.sqrt(k)
    elif distribution == "normal":
        s = torch.randn(r, k, generator=gen, dtype=torch.float64)
    elif distribution == "kaiming_uniform":
        s = (torch.rand(r, k, generator=gen, dtype=torch.float64) * 2 - 1) / np.sqrt(k)
    elif distribution == "coordinate":
        idx = torch.randperm(k, generator=gen)[:r]
        s = torch.zeros(r, k, dtype=torch.float64)
        s[torch.arange(r), idx] = 1.0
    else:
        g = torch.randn(k, r, generator=gen, dtype=torch.float64)
        q, upper = torch.linalg.qr(g)
        signs = torch.sign(torch.diagonal(upper))
        signs[signs == 0] = 1.0
        s = (q * signs).T.contiguous()  # sign fix makes the draw Haar-distributed
    s = s.to(torch.float32)
    return s if wide else s.T.contiguous()


def fingerprint(sketches: Mapping[str, torch.Tensor]) -> str:
    """A short hash of the named sketches' bytes (16 hex characters)."""
    h = hashlib.sha256()
    for name in sorted(sketches):
        t = sketches[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _sketch_fingerprint(
    round_seed: int, shapes: tuple[tuple[str, tuple[int, int]], ...], distribution: str
) -> str:
    return fingerprint({name: _make_sketch(round_seed, name, shape, distribution)
                        for name, shape in shapes})


def sketch_fingerprint(
    round_seed: int, shapes: Mapping[str, tuple[int, int]], distribution: str = "orthogonal"
) -> str:
    """``fingerprint`` of the sketches ``make_sketch`` draws for ``{name: shape}`` (cached
    per process, like the sketches)."""
    key = tuple(sorted((name, (int(s[0]), int(s[1]))) for name, s in shapes.items()))
    return _sketch_fingerprint(int(round_seed), key, distribution)


def check_fingerprint(expected: str, got: str, round_: int) -> None:
    """Raise :class:`SketchMismatchError` when the regenerated sketches' fingerprint
    ``got`` differs from the server's ``expected``."""
    if got != expected:
        raise SketchMismatchError(
            f"round {round_}: regenerated sketch fingerprint {got} differs from the server's "
            f"{expected}; refusing to train on the wrong subspace (different fedrac/torch "
            "version or sketch settings on this client?)"
        )
