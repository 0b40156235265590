"""Comparison across the runs of a multirun: table (markdown + CSV), per-round CSV and plot.

Runs are grouped by their Hydra overrides without ``seed=``, so runs that differ only
by seed give one row with mean +- std. A run whose config matches an FPFT (``fedavg``)
run except for its strategy choice gets ``gap_to_fpft`` per round (FPFT accuracy minus
its own). ``target_accuracy`` (a number, or ``"fpft-<points>"``: the matching FPFT
group's mean final accuracy minus that many) gives rounds and bytes to reach it.
Runs that log ``distance`` (the quadratic experiment) are compared on it instead
(lower is better). Hooked into Hydra as :class:`ComparisonCallback`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

METHOD_KEYS = ("strategy", "+arm", "arm")  # overrides that choose the method, not the setting


@dataclass
class Run:
    """One finished run of a sweep: its overrides, summary and per-round rows."""

    path: Path
    overrides: list[str]
    summary: dict[str, Any]
    rows: list[dict[str, float]]
    target: Any = None
    metric: str = "eval_accuracy"
    gap: dict[int, float] = field(default_factory=dict)

    @property
    def seed(self) -> str:
        return next((o.split("=", 1)[1] for o in self.overrides if o.startswith("seed=")), "")

    @property
    def group(self) -> str:
        """The run's overrides but its seed and the strategy keys its strategy ignores
        (``strategy=fedavg strategy.rank=4`` is ``strategy=fedavg``)."""
        from strategies import STRATEGIES

        ignored = {f"strategy.{k}" for k in getattr(
            STRATEGIES.get(str(self.summary.get("strategy"))), "IGNORED_KEYS", ())}
        rest = [o.lstrip("+") for o in self.overrides if not o.startswith("seed=")
                and o.lstrip("+").split("=", 1)[0] not in ignored]
        return " ".join(o.split("=", 1)[1] if o.startswith(("arm=", "setting=")) else o
                        for o in rest) or self.summary.get("label", self.path.name)

    @property
    def setting(self) -> tuple[str, ...]:
        return tuple(o for o in self.overrides if not o.startswith(METHOD_KEYS))

    @property
    def is_fpft(self) -> bool:
        return self.summary.get("strategy") == "fedavg"

    def series(self) -> list[tuple[int, float, float]]:
        """``(round, metric, cumulative bytes up+down)`` for the rounds that have the metric."""
        out, total = [], 0.0
        for r in self.rows:
            total += r.get("bytes_up", 0.0) + r.get("bytes_down", 0.0)
            if not math.isnan(r.get(self.metric, math.nan)):
                out.append((int(r["round"]), r[self.metric], total))
        return out

    def bytes_up_until(self, rnd: int | None) -> float | None:
        """Bytes uploaded in rounds ``1..rnd`` (None when ``rnd`` is None)."""
        if rnd is None:
            return None
        return sum(r.get("bytes_up", 0.0) for r in self.rows if 0 < r["round"] <= rnd)

    def final(self) -> float:
        s = self.series()
        return s[-1][1] if s else math.nan


def _float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return math.nan


def load_run(path: Path) -> Run | None:
    """The run in ``path`` (a Hydra job folder), or None when it did not finish."""
    summary, metrics = path / "summary.json", path / "metrics.csv"
    if not summary.is_file() or not metrics.is_file():
        return None
    with metrics.open() as f:
        rows = [{k: _float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = ([str(o) for o in OmegaConf.load(overrides_file)]
                 if overrides_file.is_file() else [])
    overrides = [o for o in overrides if not o.startswith(("+experiment=", "experiment="))]
    config_file = path / ".hydra" / "config.yaml"
    target = OmegaConf.load(config_file).get("target_accuracy") if config_file.is_file() else None
    run = Run(path, overrides, json.loads(summary.read_text()), rows, target)
    if rows and "distance" in rows[0]:
        run.metric = "distance"
    return run


def reach_target(series: Sequence[tuple[int, float, float]], target: float,
                 lower_is_better: bool = False) -> tuple[int | None, float | None]:
    """First ``(round, cumulative bytes)`` at which the metric reaches ``target``."""
    for rnd, value, total in series:
        if (value <= target) if lower_is_better else (value >= target):
            return rnd, total
    return None, None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]  # null in summary.json
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _pm(values: Sequence[float], fmt: str = ".4f") -> str:
    m, s = _mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m:{fmt}}" + (f" ± {s:{fmt}}" if len(values) > 1 else "")


def _fpft_groups(runs: Sequence[Run]) -> dict[tuple[str, ...], dict[str, Run]]:
    out: dict[tuple[str, ...], dict[str, Run]] = defaultdict(dict)
    for r in runs:
        if r.is_fpft:
            out[tuple(o for o in r.setting if not o.startswith("seed="))][r.seed] = r
    return out


def _resolve_target(target: Any, fpft: Mapping[str, Run] | None) -> float | None:
    if target is None:
        return None
    if isinstance(target, int | float):
        return float(target)
    text = str(target)
    if text.startswith("fpft-") and fpft:
        return statistics.fmean(r.final() for r in fpft.values()) - float(text[5:])
    return None


def compare(runs: Sequence[Run]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-group table rows and per-run-per-round rows (with ``gap_to_fpft``)."""
    fpft = _fpft_groups(runs)
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:  # one run per seed: jobs differing only in ignored keys are one run
        if all(m.seed != r.seed for m in groups[r.group]):
            groups[r.group].append(r)
    if len(groups) > 1:  # overrides every run shares say nothing about the rows: drop them
        shared = set.intersection(*(set(label.split()) for label in groups))
        groups = {(" ".join(t for t in label.split() if t not in shared) or label): members
                  for label, members in groups.items()}
    table, per_round = [], []
    for label, members in sorted(groups.items()):
        members.sort(key=lambda r: r.seed)
        first = members[0]
        lower = first.metric == "distance"
        setting = tuple(o for o in first.setting if not o.startswith("seed="))
        match = fpft.get(setting)
        target = _resolve_target(first.target, match)
        reached = [reach_target(r.series(), target, lower) if target is not None else (None, None)
                   for r in members]
        finals, gaps = [r.final() for r in members], []
        for r in members:
            ref = match.get(r.seed) if match and not r.is_fpft else None
            ref_acc = {rnd: v for rnd, v, _ in ref.series()} if ref else {}
            for rnd, value, total in r.series():
                gap = math.nan
                if rnd in ref_acc:  # positive: worse than FPFT
                    gap = value - ref_acc[rnd] if lower else ref_acc[rnd] - value
                r.gap[rnd] = gap
                per_round.append({"group": label, "seed": r.seed, "round": rnd,
                                  r.metric: value, "bytes_cumulative": total,
                                  "gap_to_fpft": gap})
            if ref:
                gaps.append(r.gap[max(r.gap)])
        s = first.summary
        row = {
            "group": label, "strategy": s.get("strategy"), "seeds": len(members),
            "metric": first.metric,
            "final_mean": _mean_std(finals)[0], "final_std": _mean_std(finals)[1],
            "final": _pm(finals, ".3e" if lower else ".4f"),
            "best": _pm([r.summary.get("best_accuracy", math.nan) for r in members]),
            "gap_to_fpft": _pm(gaps, ".3e" if lower else ".4f") if gaps else "-",
            "bytes_up_per_round": statistics.fmean(r.summary.get("bytes_up_per_round", 0)
                                                   for r in members),
            "bytes_down_per_round": statistics.fmean(r.summary.get("bytes_down_per_round", 0)
                                                     for r in members),
            "target": target,
            "rounds_to_target": _reached(reached, 0),
            "bytes_to_target": _reached(reached, 1),
            "bytes_up_to_target": _reached([(r.bytes_up_until(rnd), None) for r, (rnd, _)
                                            in zip(members, reached, strict=True)], 0),
        }
        for direction in ("up", "down"):
            kinds = defaultdict(float)
            for r in members:
                for kind, n in r.summary.get("bytes_by_kind", {}).get(direction, {}).items():
                    kinds[kind] += n / len(members)
            row[f"bytes_{direction}_by_kind"] = dict(kinds)
        tuned = [r.summary for r in members if r.summary.get("tuned_lr") is not None]
        if tuned:  # tune=lr: one tuning per group (seeds share it)
            row["tuned_lr"] = " ".join(dict.fromkeys(f"{t['tuned_lr']:g}" for t in tuned))
            row["tune"] = tuned[0]["tune"]
        table.append(row)
    return table, per_round


def _reached(reached: Sequence[tuple[int | None, float | None]], i: int) -> float | None:
    """Mean over seeds of rounds/bytes to target; None when some seed never reached it."""
    values = [r[i] for r in reached]
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def _human(n: float | None) -> str:
    from fedrac.server.results import human_bytes

    return "not reached" if n is None else human_bytes(n)


def format_comparison(table: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as a markdown table."""
    metric = table[0]["metric"] if table else "eval_accuracy"
    head = "final distance" if metric == "distance" else "final acc"
    lines = [f"| run | seeds | {head} | best acc | gap to FPFT | up/round | down/round | "
             "rounds to target | bytes to target | of which up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        rounds = row["rounds_to_target"]
        target = "" if row["target"] is None else f" (≥ {row['target']:.4f})"
        lines.append(
            f"| {row['group']} | {row['seeds']} | {row['final']} | {row['best']} | "
            f"{row['gap_to_fpft']} | {_human(row['bytes_up_per_round'])} | "
            f"{_human(row['bytes_down_per_round'])} | "
            f"{'-' if rounds is None else f'{rounds:.0f}'}{target if rounds else ''} | "
            f"{_human(row['bytes_to_target']) if row['target'] is not None else '-'} | "
            f"{_human(row['bytes_up_to_target']) if row['target'] is not None else '-'} |")
    return "\n".join(lines)


@dataclass
class PlotLine:
    """One line of the comparison plot: runs (seeds) of one method and setting; ``same``
    lists the settings of runs with identical curves, drawn once."""

    family: str
    method: str
    setting: str
    members: list[Run]
    same: list[str] = field(default_factory=list)


def _key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+")


def _method(r: Run) -> str:
    chosen = [o.split("=", 1)[1] for o in r.overrides if _key(o) in ("strategy", "arm")]
    return " ".join(chosen) or str(r.summary.get("strategy") or r.summary.get("label", "run"))


def _family(method: str) -> str:
    """``fedit_A`` / ``fedit_B`` -> ``fedit``: the panel a method is drawn in."""
    return method[:-2] if method.endswith(("_A", "_B")) else method


def plot_lines(runs: Sequence[Run]) -> tuple[list[PlotLine], list[str]]:
    """The comparison plot's lines and the overrides every run shares (left out of labels).

    Runs differing only by seed form one line; a line whose curves (metric and bytes per
    round, every seed) equal another's of the same method is folded into it.
    """
    per_run = [[o for o in r.overrides if not o.startswith("seed=")] for r in runs]
    common = [o for o in per_run[0] if all(o in p for p in per_run[1:])] if per_run else []
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r, overrides in zip(runs, per_run, strict=True):
        setting = " ".join(o.lstrip("+") for o in overrides
                           if o not in common and _key(o) not in ("strategy", "arm"))
        groups[(_method(r), setting)].append(r)
    lines: list[PlotLine] = []
    seen: dict[tuple[str, tuple], PlotLine] = {}
    for (method, setting), members in sorted(groups.items()):
        members.sort(key=lambda r: r.seed)
        curve = tuple(tuple(r.series()) + (r.seed,) for r in members)
        twin = seen.get((method, curve))
        if twin is not None:
            twin.same.append(setting)
            continue
        line = PlotLine(_family(method), method, setting, members, [setting])
        seen[(method, curve)] = line
        lines.append(line)
    return lines, [o.lstrip("+") for o in common]


def _folded(settings: Sequence[str]) -> str:
    """``["strategy.rank=1", "strategy.rank=4"]`` -> ``"strategy.rank=1|4"``."""
    pairs = [x.split("=", 1) for x in settings]
    if all(len(p) == 2 and " " not in x for p, x in zip(pairs, settings, strict=True)) \
            and len({p[0] for p in pairs}) == 1:
        return f"{pairs[0][0]}=" + "|".join(p[1] for p in pairs)
    return f"{len(settings)} settings"


_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 3)), (0, (6, 2, 1, 2))]
_MARKERS = ["", "o", "s", "^", "v", "D"]


def _is_fpft(family: str) -> bool:
    return family in ("fedavg", "fpft")


def plot_comparison(runs: Sequence[Run], path: Path) -> None:
    """Small multiples: one column per method family (``fedit_A``/``fedit_B`` -> ``fedit``),
    rows the metric per round, per byte uploaded (log scale) and per byte sent (up + down).

    Colour names the method, line style the setting (both in the legends outside the
    axes); overrides every run shares go to the title, not the labels; identical curves
    are drawn once. FPFT appears in grey in the other panels as the reference. Mean over
    seeds, band: one std.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, NullFormatter

    lines, common = plot_lines(runs)
    families = sorted({ln.family for ln in lines}, key=lambda f: (not _is_fpft(f), f))
    methods = sorted({ln.method for ln in lines}, key=lambda m: (not _is_fpft(_family(m)), m))
    settings = list(dict.fromkeys(ln.setting for ln in lines))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    style = {s: (_STYLES[i % len(_STYLES)], _MARKERS[i // len(_STYLES) % len(_MARKERS)])
             for i, s in enumerate(settings)}
    metric = runs[0].metric
    from fedrac.server.results import byte_unit

    up_unit = byte_unit(max((r.bytes_up_until(r.series()[-1][0]) for r in runs if r.series()),
                            default=0.0))
    all_unit = byte_unit(max((r.series()[-1][2] for r in runs if r.series()), default=0.0))
    ncol = len(families)
    rows = ("round", f"{up_unit[0]} uploaded", f"{all_unit[0]} sent (up + down)")
    longest = max([len(m) for m in methods] + [len(s) for s in settings] + [22])
    width, height, legend_w = 2.9 * ncol + 1.0, 2.5 * len(rows) + 1.0, 1.0 + 0.055 * longest
    fig, axes = plt.subplots(len(rows), ncol, figsize=(width + legend_w, height),
                             sharey=True, sharex="row", squeeze=False)
    fpft = [ln for ln in lines if _is_fpft(ln.family)]

    def draw(col: int, ln: PlotLine, grey: bool = False) -> None:
        series = [r.series() for r in ln.members]
        n = min(len(s) for s in series)
        if n == 0:
            return
        vals = np.array([[p[1] for p in s[:n]] for s in series])
        with np.errstate(invalid="ignore"):  # diverged runs hold inf
            mean, std = vals.mean(axis=0), vals.std(axis=0)
        up = np.mean([[r.bytes_up_until(p[0]) / up_unit[1] for p in s[:n]]
                      for r, s in zip(ln.members, series, strict=True)], axis=0)
        xs = ([p[0] for p in series[0][:n]], up,
              np.mean([[p[2] / all_unit[1] for p in s[:n]] for s in series], axis=0))
        ls, marker = style[ln.setting]
        c = (0.6, 0.6, 0.6) if grey else colour[ln.method]
        for row, x in enumerate(xs):
            ax = axes[row][col]
            ax.plot(x, mean, color=c, linestyle=ls, marker=marker or None, markevery=0.1,
                    markersize=3, linewidth=0.9 if grey else 1.4, zorder=1 if grey else 2)
            if len(ln.members) > 1 and not grey:
                ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=c)

    for col, fam in enumerate(families):
        if not _is_fpft(fam):
            for ln in fpft:
                draw(col, ln, grey=True)
        mine = [ln for ln in lines if ln.family == fam]
        for ln in mine:
            draw(col, ln)
        notes = [f"{ln.method if ln.method != fam else ''} {_folded(ln.same)}: identical, "
                 "drawn once".strip() for ln in mine if len(ln.same) > 1]
        axes[0][col].set_title("\n".join([fam, *notes]), fontsize=8)
        for row, xlabel in enumerate(rows):
            axes[row][col].set_xlabel(xlabel, fontsize=8)
    ylabel = "distance to optimum" if metric == "distance" else "eval accuracy"
    for row_axes in axes:
        row_axes[0].set_ylabel(ylabel, fontsize=8)
        for ax in row_axes:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if metric == "distance":  # diverging runs leave the plot at the top
                ax.set_yscale("log")
                ax.set_ylim(top=10.0)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:  # uploads span decades (FPFT against Fed-SB): log, round 0 off
        ax.set_xscale("log", nonpositive="mask")
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes[2]:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    method_handles = [Line2D([], [], color=colour[m], label=m) for m in methods]
    if fpft and len(families) > 1:
        method_handles.append(Line2D([], [], color=(0.6, 0.6, 0.6), linewidth=0.9,
                                     label="FPFT (reference, grey)"))
    setting_handles = []
    for s in settings:
        setting_handles.append(Line2D([], [], color="black", linestyle=style[s][0],
                                      marker=style[s][1] or None, markersize=3,
                                      label=s or "(no other override)"))
    right = width / (width + legend_w)
    handles = [Line2D([], [], linestyle="none", label="method (colour)"), *method_handles]
    if len(settings) > 1 or settings[0]:
        handles += [Line2D([], [], linestyle="none", label=" "),
                    Line2D([], [], linestyle="none", label="setting (line style)"),
                    *setting_handles]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(right + 0.005, 0.95),
               fontsize=7, frameon=False, handlelength=3.2)
    title = f"{ylabel}, mean over seeds (band: ± std)"
    if common:
        title += "; every run: " + " ".join(common)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.9 / (width + legend_w), right=right - 0.01,
                        bottom=0.7 / height, top=1 - 0.75 / height, wspace=0.08,
                        hspace=0.45)
    from fedrac.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_comparison(sweep_dir: str | Path) -> str | None:
    """Write comparison.md/.csv, comparison_rounds.csv and comparison.png into ``sweep_dir``."""
    from fedrac.settings.sweep import failure_lines, load_failure

    sweep = Path(sweep_dir)
    runs, failed = [], []
    for p in sorted(sweep.iterdir()) if sweep.is_dir() else []:
        if not p.is_dir():
            continue
        failure = load_failure(p)
        if failure:
            failed.append(failure)
        elif run := load_run(p):
            runs.append(run)
    if not runs and not failed:
        return None
    table, per_round = compare(runs)
    for row in table:
        row["status"] = "ok"
    text = format_comparison(table) if runs else ""
    if failed:
        text = (text + "\n\n" if text else "") + failure_lines(failed)
        table = table + [{"group": f["overrides"], "status": "failed", "failure": f["failure"]}
                         for f in failed]
    from fedrac.experiments.paper import paper_table
    from fedrac.tune import format_tuning

    extra = "\n\n".join(t for t in (format_tuning(table), paper_table(runs) if runs else "")
                        if t)
    if extra:
        text += "\n\n" + extra
    from fedrac.atomic import write_text

    write_text(sweep / "comparison.md", text + "\n")
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in row.items()}
            for row in table]
    _write_csv(sweep / "comparison.csv", flat)
    _write_csv(sweep / "comparison_rounds.csv", per_round)
    if runs:
        plot_comparison(runs, sweep / "comparison.png")
    return text


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    from fedrac.atomic import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


class ComparisonCallback(Callback):
    """Hydra callback: after a multirun, write and print the comparison of its runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        where = config.get("output_dir") or config.hydra.sweep.dir  # a fixed output_dir: there
        text = write_comparison(where)
        if text:
            print(f"\nfedrac: comparison of the runs in {where}\n{text}", flush=True)
