"""The ``dp_compare`` table and plot: final accuracy per method and epsilon over a sweep folder.

``python -m fedrac.experiments.dp_compare <sweep dir> [--out docs/privacy]`` reads every run's
``summary.json`` (strategy, target and spent epsilon, noise multiplier, final accuracy) and
writes ``<out>.md`` (mean +- std over seeds, the epsilon each run spent and its sigma) and
``<out>.png`` (accuracy vs epsilon, inf at the right).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

METHODS = ("fedavg", "fedit", "ffa_lora", "rac_lora", "flora")
LABELS = {"fedavg": "FPFT (FedAvg)", "fedit": "FedIT", "ffa_lora": "FFA-LoRA",
          "rac_lora": "Fed-RAC-LoRA", "flora": "FLoRA"}


def load(sweep: Path) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """``(strategy, target epsilon) -> [summary, ...]`` for the finished runs of ``sweep``."""
    runs: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(sweep.glob("*/summary.json")):
        s = json.loads(path.read_text())
        p = s.get("privacy") or {}
        target = p.get("target_epsilon")
        runs[(s["strategy"], math.inf if target is None else float(target))].append(s)
    return runs


def _fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(runs: dict[tuple[str, float], list[dict[str, Any]]]) -> str:
    """Markdown: a row per method, a column per epsilon (final accuracy, mean ± std)."""
    eps = sorted({e for _, e in runs})
    head = "| method | " + " | ".join(f"ε = {'∞' if math.isinf(e) else f'{e:g}'}" for e in eps)
    lines = [head + " |", "|---" * (len(eps) + 1) + "|"]
    for m in [m for m in METHODS if any(k[0] == m for k in runs)]:
        cells = [_fmt([s["final_accuracy"] for s in runs.get((m, e), [])]) if (m, e) in runs
                 else "-" for e in eps]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "| ε target | ε spent (max over runs) | noise multiplier σ |", "|---|---|---|"]
    for e in eps:
        spent = [s["epsilon"] for k, ss in runs.items() if k[1] == e for s in ss]
        sigma = {round(s["privacy"]["noise_multiplier"], 4) for k, ss in runs.items()
                 if k[1] == e for s in ss}
        lines.append(f"| {'∞' if math.isinf(e) else f'{e:g}'} | {max(spent):.4g} | "
                     f"{', '.join(f'{x:g}' for x in sorted(sigma))} |")
    return "\n".join(lines)


def plot(runs: dict[tuple[str, float], list[dict[str, Any]]], path: Path, title: str) -> None:
    """Final accuracy (mean, std bars) vs epsilon per method; inf drawn at the right end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({e for _, e in runs})
    finite = [e for e in eps if math.isfinite(e)]
    x_inf = max(finite) * 2.5 if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m in [m for m in METHODS if any(k[0] == m for k in runs)]:
        xs, ys, es = [], [], []
        for e in eps:
            acc = [s["final_accuracy"] for s in runs.get((m, e), [])]
            if acc:
                xs.append(x_inf if math.isinf(e) else e)
                ys.append(statistics.mean(acc))
                es.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[m])
    ax.set_xscale("log")
    ax.set_xticks([*finite, x_inf], [*(f"{e:g}" for e in finite), "∞"])
    ax.set(xlabel="ε (δ = 1/N)", ylabel="final accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.13, top=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: a sweep folder in, ``<out>.md`` and ``<out>.png`` out."""
    parser = argparse.ArgumentParser(prog="python -m fedrac.experiments.dp_compare")
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="path without suffix")
    parser.add_argument("--title", default="dp_compare (digits)")
    args = parser.parse_args(argv)
    runs = load(args.sweep)
    if not runs:
        raise SystemExit(f"no summary.json under {args.sweep}")
    out = args.out or args.sweep / "dp_compare"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    out.with_suffix(".md").write_text(md + "\n")
    plot(runs, out.with_suffix(".png"), args.title)
    print(md)


if __name__ == "__main__":
    main()
