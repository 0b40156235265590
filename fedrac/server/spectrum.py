"""The spectrum monitor: per round and adapted layer, the singular values of X = W - W0.

Kim, Kim & Ryu (arXiv 2502.09376) show that LoRA with zero initialisation and weight decay
either reaches the low-rank, small-magnitude global minimum or "fails loudly" at a
high-rank, large-magnitude point. This monitor makes that visible: every ``monitor_every``
rounds it appends to ``spectrum.csv`` one row per adapted layer with

- ``rank``: the numerical rank of ``X``, the number of singular values above
  ``rank_tol * sigma_1`` (relative tolerance, default 1e-3: float32 weights put rounding
  noise of about 1e-7 * ||W|| into ``X``);
- ``nuclear_norm`` ``||X||_*`` and ``frobenius_norm`` ``||X||_F``;
- ``top_singular_values``: the largest ``top_k`` singular values, ``;``-separated;
- ``balance``: ``||A A^T - B^T B||_F`` of the global factors where the method keeps both
  (FedIT, FedEx-LoRA, COLA within a link, FLoRA); empty otherwise (RAC-LoRA, FFA-LoRA,
  FedAvg).

Layers whose short side exceeds ``exact_max`` use a randomised SVD (``torch.svd_lowrank``,
in float32, ``q = min(short side, 2 * top_k + 16)``, 2 power iterations): then
``nuclear_norm`` is the sum of the ``q`` values found (a lower bound) and ``rank`` is capped
at ``q``. The cost per observed round is kept in :attr:`SpectrumMonitor.seconds` (one core:
64x64 0.2 ms and 512x512 81 ms exact; 768x768 17 ms, 768x3072 72 ms and 4096x4096 0.37 s
randomised).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedrac.adapters import LayerSpec
from fedrac.settings.typed import RunSettings

COLUMNS = ("round", "layer", "rank", "nuclear_norm", "frobenius_norm", "top_singular_values",
           "balance")


def layer_matrix(spec: LayerSpec, weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as its ``d_out x d_in`` matrix (conv kernels flattened, ``Conv1D``
    transposed back), in float64."""
    w = weight.detach().to("cpu", torch.float64)
    return w.T if spec.transposed else w.reshape(spec.d_out, spec.d_in)


def singular_values(x: torch.Tensor, top_k: int, exact_max: int) -> tuple[torch.Tensor, bool]:
    """The singular values of ``x`` (descending) and whether they are all of them (exact SVD)
    or only the leading ones of a randomised SVD (short side above ``exact_max``)."""
    short = min(x.shape)
    if short <= exact_max:
        return torch.linalg.svdvals(x), True
    q = min(short, 2 * top_k + 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # svd_lowrank draws from the global RNG: keep it reproducible
        _, s, _ = torch.svd_lowrank(x.to(torch.float32), q=q, niter=2)
    return s.to(torch.float64), q == short


def layer_stats(x: torch.Tensor, top_k: int = 8, rank_tol: float = 1e-3,
                exact_max: int = 512) -> dict[str, Any]:
    """Rank, nuclear and Frobenius norm and the top singular values of one matrix."""
    s, _ = singular_values(x, top_k, exact_max)
    s1 = float(s[0]) if s.numel() else 0.0
    rank = int((s > rank_tol * s1).sum()) if s1 > 0 else 0
    return {"rank": rank, "nuclear_norm": float(s.sum()),
            "frobenius_norm": float(torch.linalg.norm(x)),
            "top_singular_values": [float(v) for v in s[:top_k]]}


def balance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||A A^T - B^T B||_F``: zero when the two factors are balanced (RefLoRA's target)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float(torch.linalg.norm(a @ a.T - b.T @ b))


class SpectrumMonitor:
    """Appends each observed round's per-layer spectrum of ``W - W0`` to ``spectrum.csv``.

    ``every``: observe rounds ``every, 2 every, ...`` (and the last one when ``num_rounds``
    is given); 0 switches the monitor off (no file).
    """

    def __init__(self, output_dir: str | Path, layers: Mapping[str, LayerSpec],
                 initial: Mapping[str, torch.Tensor], every: int = 1, top_k: int = 8,
                 rank_tol: float = 1e-3, exact_max: int = 512,
                 num_rounds: int | None = None) -> None:
        self.layers = dict(layers)
        self.every, self.top_k, self.rank_tol = int(every), int(top_k), float(rank_tol)
        self.exact_max, self.num_rounds = int(exact_max), num_rounds
        # W0 by reference (the server's W0 is read-only views of its record, never written):
        # a float64 copy of every adapted layer would double the model in memory
        self.initial = {n: initial[spec.weight_key] for n, spec in self.layers.items()}
        self.seconds: list[float] = []
        self.last: dict[str, dict[str, Any]] = {}
        self.path = Path(output_dir) / "spectrum.csv"
        self._file = None
        if self.every > 0:
            self._file = self.path.open("w", newline="")
            self._writer = csv.writer(self._file, lineterminator="\n")  # LF, also on resume
            self._writer.writerow(COLUMNS)
            self._file.flush()

    def due(self, server_round: int) -> bool:
        """Whether round ``server_round`` is observed."""
        return self.every > 0 and server_round >= 1 and (
            server_round % self.every == 0 or server_round == self.num_rounds)

    def observe(self, server_round: int, state: Mapping[str, torch.Tensor],
                factors: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, dict[str, Any]] | None:
        """Write the round's rows (``factors``: the method's global ``<layer>.lora_A/B``, for
        the balance) and return them by layer; ``None`` when the round is not due."""
        if not self.due(server_round):
            return None
        start = time.perf_counter()
        out: dict[str, dict[str, Any]] = {}
        for name, spec in self.layers.items():
            x = layer_matrix(spec, state[spec.weight_key]) - layer_matrix(spec,
                                                                      self.initial[name])
            stats = layer_stats(x, self.top_k, self.rank_tol, self.exact_max)
            a, b = (factors or {}).get(f"{name}.lora_A"), (factors or {}).get(f"{name}.lora_B")
            stats["balance"] = balance(a, b) if a is not None and b is not None else math.nan
            out[name] = stats
            self._writer.writerow([
                server_round, name, stats["rank"], f"{stats['nuclear_norm']:.8g}",
                f"{stats['frobenius_norm']:.8g}",
                ";".join(f"{v:.6g}" for v in stats["top_singular_values"]),
                "" if math.isnan(stats["balance"]) else f"{stats['balance']:.8g}"])
        self._file.flush()
        self.seconds.append(time.perf_counter() - start)
        self.last = out
        return out

    def state_dict(self) -> dict[str, Any]:
        """The rows written so far, the cost per round and the last rows (for a checkpoint)."""
        if self._file is not None and not self._file.closed:
            self._file.flush()
        return {"csv": self.path.read_text() if self._file is not None else "",
                "seconds": list(self.seconds), "last": self.last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: spectrum.csv is rewritten with the saved rows."""
        self.seconds, self.last = [float(t) for t in state["seconds"]], dict(state["last"])
        if self._file is not None and state["csv"]:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(state["csv"])
            self._file.flush()

    def close(self) -> None:
        """Close ``spectrum.csv``."""
        if self._file is not None and not self._file.closed:
            self._file.close()

    def summary(self) -> dict[str, Any] | None:
        """For summary.json: the settings, the cost per observed round and the last rows."""
        if self.every <= 0:
            return None
        n = len(self.seconds)
        return {"every": self.every, "top_k": self.top_k, "rank_tol": self.rank_tol,
                "exact_max": self.exact_max, "rounds_observed": n,
                "seconds_per_observed_round": sum(self.seconds) / n if n else 0.0,
                "final": self.last}


def monitor_from_config(run: RunSettings, layers: Mapping[str, LayerSpec],
                        initial: Mapping[str, torch.Tensor]) -> SpectrumMonitor:
    """The run's monitor from ``monitor_every`` and the ``monitor`` settings."""
    m = run.monitor
    return SpectrumMonitor(run.output_dir, layers, initial, every=run.monitor_every,
                           top_k=m.top_k, rank_tol=m.rank_tol, exact_max=m.exact_max,
                           num_rounds=run.num_rounds)


def global_factors(strategy: Any) -> dict[str, torch.Tensor] | None:
    """The strategy's global two-factor adapters, where it keeps them (``adapters``)."""
    adapters = getattr(strategy, "adapters", None)
    return dict(adapters) if adapters else None
