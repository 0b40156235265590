"""The table of ``+experiment=loud_failure``: rank, magnitude and certificate of each run.

    python -m fedrac.experiments.loud_failure <sweep folder> [<sweep folder> ...]

prints a Markdown table (one row per run, read from its ``summary.json`` and ``metrics.csv``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

HEADER = ("| method | λ | init | step·L | ref rank | rank X (r10 / r100 / final) | "
          "‖X‖_F / ‖X_ref‖_F | ‖∇L‖₂ / (λ/s) | prox residual | ‖X − X_ref‖ / ‖X_ref‖ | "
          "certificate | fails loudly |")


def _rank_at(rows: list[dict[str, str]], rnd: int) -> str:
    for r in rows:
        if int(r["round"]) == rnd:
            return r.get("rank", "") or "–"
    return "–"


def run_row(folder: Path) -> tuple[tuple, str] | None:
    """One run's sort key and table row (``None`` without a certificate)."""
    summary = json.loads((folder / "summary.json").read_text())
    c = summary.get("certificate")
    if not c:
        return None
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    step = summary["config"]["quadratic"]["step"]
    final = rows[-1].get("rank") or "–"
    ranks = f"{_rank_at(rows, 10)} / {_rank_at(rows, 100)} / {final}"
    mag = c["frobenius_norm"] / c["ref_frobenius_norm"] if c["ref_frobenius_norm"] else math.nan
    diverged = c.get("diverged") or not math.isfinite(float(summary["final_distance"]))
    name = summary["strategy"] + ("" if c.get("covered") else " (chain)")
    cert = "diverged" if diverged else ("holds" if c["holds"] else "fails")
    loud = "**yes**" if c["fails_loudly"] else "no"
    row = (f"| {name} | {c['lambda']:g} | {c['init']} | {step:g} | {c['ref_rank']} | {ranks} | "
           f"{mag:.3f} | {c['ratio']:.3g} | {c['prox_residual']:.2e} | {c['ref_distance']:.2e} "
           f"| {cert} | {loud} |")
    return (summary["strategy"], c["lambda"], c["init"], step), row


def table(folders: Iterable[Path]) -> str:
    """The Markdown table over every run folder below ``folders``."""
    found = []
    for top in folders:
        for summary in sorted(Path(top).glob("**/summary.json")):
            got = run_row(summary.parent)
            if got is not None:
                found.append(got)
    lines = [HEADER, "|" + "|".join("---" for _ in HEADER.split("|")[1:-1]) + "|"]
    lines += [row for _, row in sorted(found)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(p) for p in sys.argv[1:]))
