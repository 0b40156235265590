"""The RAC-LoRA paper's MNIST numbers (DESIGN.md §8) and fedrac's table beside them.

A sweep whose runs choose ``+arm=<method>_<A|B>`` (or ``fpft``) and ``+setting=<name>``
(the ``digits_table`` / ``mnist_table`` experiments) gets a pivot: one row per method,
per setting the mean ± std final accuracy (%) with the output-side factor ``B`` and the
input-side factor ``A`` trained, then the paper's two columns.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

# method -> (output-side factor trained, input-side factor trained), accuracy in %
PAPER_MNIST = {
    "fedit": ("LoRA", 83.8, 87.0),
    "cola": ("COLA", 92.6, 96.2),
    "ffa_lora": ("AsymmLoRA / FFA-LoRA", 62.3, 81.6),
    "rac_lora": ("RAC-LoRA", 92.0, 96.1),
    "fpft": ("FPFT", 98.0, 98.0),
}


def _choice(overrides: Sequence[str], key: str) -> str | None:
    for o in overrides:
        k, _, v = o.lstrip("+").partition("=")
        if k == key:
            return v
    return None


def _cell(values: Sequence[float]) -> str:
    vals = [100 * v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.1f} ± {sd:.1f}"


def paper_table(runs: Sequence[Any]) -> str | None:
    """The pivot beside the paper's numbers (methods the paper lacks are left out), or None
    when the runs are not arm x setting."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    settings: list[str] = []
    protocol = False  # a factor-orientation arm (``<method>_A`` / ``_B``) of the paper's table
    for r in runs:
        arm, setting = _choice(r.overrides, "arm"), _choice(r.overrides, "setting")
        if arm is None or setting is None:
            return None
        method, _, side = arm.rpartition("_") if arm != "fpft" else ("fpft", "", "")
        if method not in PAPER_MNIST or method != "fpft" and side not in ("A", "B"):
            continue  # a method the paper has no number for (fed_sb_r5), or not its protocol
        if method != "fpft":
            protocol = True
        if setting not in settings:
            settings.append(setting)
        for s in (("B", "A") if method == "fpft" else (side,)):
            cells[(method, s, setting)].append(r.final())
    if not protocol:
        return None
    head = "| method | " + " | ".join(f"{s} B (out) | {s} A (in)" for s in settings) + \
        " | paper B (133 params) | paper A (912 params) |"
    lines = [head, "|---" * (2 * len(settings) + 3) + "|"]
    for method, (name, paper_b, paper_a) in PAPER_MNIST.items():
        row = [_cell(cells.get((method, side, s), [])) for s in settings for side in ("B", "A")]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {paper_b} | {paper_a} |")
    return "Final accuracy (%), mean ± std over seeds, beside the paper's MNIST numbers:\n\n" \
        + "\n".join(lines)
