"""Run results: metrics.csv (a row per round, flushed as it goes), summary.json,
model.safetensors, curves.png, and the progress line and final table."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedrac.atomic import atomic_path, write_json, write_text
from fedrac.server.tracking import Tracker, make_tracker, round_scalars
from fedrac.settings.typed import Settings
from fedrac.wire.ledger import ByteLedger

log = logging.getLogger(__name__)

KINDS = ("weights", "factors", "residual", "deltas", "seeds", "config", "metrics", "modules",
         "eval", "secagg", "gradient")  # gradient: fed_sb's one-off init upload
# client-side evaluation (fraction_evaluate > 0): weighted means and spread across clients
CLIENT_EVAL = tuple(f"client_eval_{m}{s}" for m in ("loss", "accuracy")
                    for s in ("", "_std", "_min", "_max")) + ("client_eval_clients",)
GENERATION = ("eval_exact_match", "eval_f1")  # task.generate_eval (fedrac/tasks/generation.py)
COLUMNS = (
    ["round", "train_loss", "eval_loss", "eval_accuracy", "eval_perplexity",
     *GENERATION, "bytes_up",
     "bytes_down", "seconds", "client_seconds", "clients", "failed", "rejected", "epsilon",
     "clip_norm", "secagg_error_bound"]
    + [f"bytes_{d}_{k}" for d in ("up", "down") for k in KINDS]
    + list(CLIENT_EVAL)
)


PROGRESS = ("auto", "bar", "lines")


def progress_bar(settings: Settings, num_rounds: int) -> Any:
    """A tqdm bar over the rounds (``progress=bar``, or ``auto`` with stdout a terminal),
    else ``None``: one progress line per round (logs, CI, tests)."""
    mode = settings.run.progress
    if mode == "lines" or (mode == "auto" and not sys.stdout.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=num_rounds, desc=settings.strategy.name, unit="round",
                file=sys.stdout, dynamic_ncols=True, leave=True)


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (powers of 1024, named as such)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class RunRecorder:
    """Writes one run's results into ``output_dir`` as the rounds go by."""

    def __init__(self, output_dir: str | Path, settings: Settings, ledger: ByteLedger,
                 round_metrics: Mapping[int, Mapping[str, float]], num_rounds: int,
                 privacy: Mapping[str, Any] | None = None) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings, self.ledger, self.round_metrics = settings, ledger, round_metrics
        self.num_rounds = num_rounds
        self.privacy = dict(privacy) if privacy else None  # resolved settings (fedrac.privacy.dp)
        # SecAgg+ per-round figures (fedrac.privacy.secagg)
        self.secagg: dict[str, Any] | None = None
        self._privacy_last = {"epsilon": 0.0 if self.privacy else math.nan,
                              "clip_norm": (self.privacy or {}).get("clip_norm", math.nan)}
        self.rows: list[dict[str, Any]] = []
        self._t0 = self._last = time.perf_counter()
        self._csv_lines: list[str] = []
        self._write_csv()
        self._bar = progress_bar(settings, num_rounds)
        self.tracker = make_tracker(settings, self.dir)  # logger=tensorboard | mlflow
        self._totals: dict[str, float] = {}

    def log_round(self, server_round: int, eval_loss: float, eval_accuracy: float,
                  eval_perplexity: float = math.nan,
                  metrics: Mapping[str, float] | None = None) -> dict:
        """Record a finished round (``nan`` where it was not evaluated) and print progress
        (``eval_perplexity``: language-model tasks only; ``metrics``: the evaluation's other
        figures, e.g. ``eval_exact_match`` / ``eval_f1``)."""
        now = time.perf_counter()
        m = self.round_metrics.get(server_round, {})
        row: dict[str, Any] = {
            "round": server_round, "train_loss": m.get("train_loss", math.nan),
            "eval_loss": eval_loss, "eval_accuracy": eval_accuracy,
            "eval_perplexity": eval_perplexity,
            **{k: float((metrics or {}).get(k, math.nan)) for k in GENERATION},
            "bytes_up": self.ledger.round_total(server_round, "up"),
            "bytes_down": self.ledger.round_total(server_round, "down"),
            "seconds": now - self._last if server_round else 0.0,
            "client_seconds": m.get("client_seconds", 0.0),
            "clients": int(m.get("clients", 0)), "failed": int(m.get("failed", 0)),
            "rejected": int(m.get("rejected", 0)),
            "secagg_error_bound": m.get("secagg_error_bound", math.nan),
        }
        for key in ("epsilon", "clip_norm"):  # privacy: carried over rounds without a release
            self._privacy_last[key] = m.get(key, self._privacy_last[key])
            row[key] = self._privacy_last[key]
        for d in ("up", "down"):
            kinds = self.ledger.round_kinds(server_round, d)
            for k in KINDS:
                row[f"bytes_{d}_{k}"] = kinds.get(k, 0)
        for key in CLIENT_EVAL:
            value = m.get(key)
            row[key] = math.nan if value is None else (
                int(value) if key == "client_eval_clients" else float(value))
        self._last = now
        self.rows.append(row)
        self._csv_lines.append(_csv_line(row))
        self._write_csv()
        self._track("log_round", server_round, round_scalars(row, self._totals))
        if self._bar is None:
            print(self.progress_line(row), flush=True)
        else:
            self._bar.update(server_round - self._bar.n)
            if not math.isnan(row["eval_accuracy"]):
                self._bar.set_postfix_str(
                    f"acc {row['eval_accuracy']:.4f} loss {row['eval_loss']:.4f} | "
                    f"up {human_bytes(row['bytes_up'])}/round", refresh=True)
        return row

    def _write_csv(self) -> None:
        """Rewrite metrics.csv (header and every row so far) atomically."""
        head = io.StringIO()
        csv.DictWriter(head, fieldnames=COLUMNS).writeheader()
        write_text(self.dir / "metrics.csv", head.getvalue() + "".join(self._csv_lines))

    def state_dict(self) -> dict[str, Any]:
        """The rows so far and the values carried between rounds (for a checkpoint)."""
        return {"rows": [dict(r) for r in self.rows], "privacy_last": dict(self._privacy_last),
                "totals": dict(self._totals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: metrics.csv is rewritten with the saved rows."""
        self.rows = [dict(r) for r in state["rows"]]
        self._privacy_last.update(state["privacy_last"])
        self._totals = dict(state["totals"])
        self._csv_lines = [_csv_line(r) for r in self.rows]
        self._write_csv()

    def progress_line(self, row: Mapping[str, Any]) -> str:
        """``[round 3/100] acc 0.8123 loss 0.5234 | train 0.61 | up 3.1 KB down 402 KB | ...``"""
        acc = row["eval_accuracy"]
        ev = "acc   -    loss   -   " if math.isnan(acc) else \
            f"acc {acc:.4f} loss {row['eval_loss']:.4f}"
        if not math.isnan(row.get("eval_perplexity", math.nan)):
            ev += f" ppl {row['eval_perplexity']:.2f}"
        if not math.isnan(row.get("eval_exact_match", math.nan)):
            ev += f" em {row['eval_exact_match']:.3f} f1 {row['eval_f1']:.3f}"
        tl = row["train_loss"]
        train = "-" if math.isnan(tl) else f"{tl:.4f}"
        ca = row.get("client_eval_accuracy", math.nan)
        if not math.isnan(ca):
            train += (f" | clients acc {ca:.4f} ({row['client_eval_accuracy_min']:.2f}-"
                      f"{row['client_eval_accuracy_max']:.2f})")
        width = len(str(self.num_rounds))
        return (f"[round {row['round']:>{width}}/{self.num_rounds}] {ev} | train {train} | "
                f"up {human_bytes(row['bytes_up'])} down {human_bytes(row['bytes_down'])} | "
                f"{row['seconds']:.2f} s (clients {row['client_seconds']:.2f} s)")

    def finish(self, final_state: Mapping[str, torch.Tensor],
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json, model.safetensors and curves.png; return the summary
        (with ``extra`` entries added, e.g. the label names and the exports).

        ``status`` is ``"failed"`` (with a one-line ``failure``) when no round had a valid
        reply, or when ``extra["model_changed"]`` is false: the result is the starting model.
        """
        if self._bar is not None:
            self._bar.close()
            if self.rows:
                print(self.progress_line(self.rows[-1]), flush=True)
        with atomic_path(self.dir / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in final_state.items()},
                      str(tmp))
        summary = {**self.summary(), **(extra or {})}
        summary.update(run_status(summary))
        write_json(self.dir / "summary.json", summary)
        plot_curves(self.rows, self.dir / "curves.png", title=summary["label"])
        self._track("finish", summary, self.dir)
        return summary

    def _track(self, method: str, *args: Any) -> None:
        """Call the tracker; when it fails mid-run, warn once and go on without it (the run
        folder keeps everything)."""
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # noqa: BLE001 - a tracking server going away ends no run
            log.warning("logger: %s failed (%s); the run goes on, results in %s", method,
                        str(err).splitlines()[0] if str(err) else type(err).__name__, self.dir)
            self.tracker = Tracker()

    def summary(self) -> dict[str, Any]:
        """Final and best accuracy, totals of bytes and seconds, the key config choices."""
        evaluated = [r for r in self.rows if not math.isnan(r["eval_accuracy"])]
        rounds = [r for r in self.rows if r["round"] > 0]
        best = max(evaluated, key=lambda r: r["eval_accuracy"], default=None)
        final = evaluated[-1] if evaluated else None
        totals = self.ledger.totals()
        st, run = self.settings, self.settings.run
        s = st.strategy.options
        label = s["name"] + (f" r={s['rank']}" if s["name"] != "fedavg" and "rank" in s else "")
        n = max(len(rounds), 1)
        tuned = run.tune.get("result")  # tune=lr (fedrac/tune.py)
        target = run.target_accuracy
        reached, total = None, 0
        for r in self.rows:
            total += r["bytes_up"] + r["bytes_down"]
            if isinstance(target, int | float) and r["eval_accuracy"] >= target:
                reached = {"round": r["round"], "bytes": total}
                break
        return {
            "label": label,
            "strategy": s["name"],
            "rounds": len(rounds),
            "rounds_with_valid_replies": sum(1 for r in rounds if r["clients"] > 0),
            "initial_accuracy": self.rows[0]["eval_accuracy"] if self.rows else math.nan,
            "final_accuracy": final["eval_accuracy"] if final else math.nan,
            "final_eval_loss": final["eval_loss"] if final else math.nan,
            "final_eval_perplexity": final.get("eval_perplexity", math.nan) if final
            else math.nan,
            **{f"final_{k}": final.get(k, math.nan) if final else math.nan
               for k in GENERATION},
            "best_accuracy": best["eval_accuracy"] if best else math.nan,
            "best_round": best["round"] if best else None,
            **_final_client_eval(self.rows),
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "bytes_up_per_round": sum(r["bytes_up"] for r in rounds) / n,
            "bytes_down_per_round": sum(r["bytes_down"] for r in rounds) / n,
            "bytes_by_kind": totals,
            "target_accuracy": target,
            "rounds_to_target": reached["round"] if reached else None,
            "bytes_to_target": reached["bytes"] if reached else None,
            "seconds": time.perf_counter() - self._t0,
            "seconds_per_round": sum(r["seconds"] for r in rounds) / n,
            "client_seconds_per_round": sum(r["client_seconds"] for r in rounds) / n,
            "epsilon": self._privacy_last["epsilon"],
            "privacy": self.privacy,
            "secagg": None if self.secagg is None else {
                **{k: v for k, v in dict(st.privacy.secagg_options).items()},
                "error_bound_max": max((r["error_bound"] for r in self.secagg["rounds"]),
                                       default=math.nan),
                "seconds_per_round": sum(r["seconds"] for r in self.secagg["rounds"])
                / max(len(self.secagg["rounds"]), 1)},
            **({"tuned_lr": tuned["lr"], "tune": tuned} if tuned else {}),
            "config": {
                "strategy": dict(s), "dataset": st.data.name,
                "task": st.data.task.get("name", "classification"),
                "model": st.model.options.get("name", st.model.options.get("_target_")),
                "partitioner": dict(st.data.partitioner),
                "engine": run.engine["name"], "num_clients": run.num_clients,
                "fraction_train": run.fraction_train, "num_rounds": run.num_rounds,
                "seed": run.seed, "device": run.device,
                "client": dataclasses.asdict(st.client),
            },
        }


def _csv_line(row: Mapping[str, Any]) -> str:
    """One metrics.csv row (``nan`` as an empty cell)."""
    line = io.StringIO()
    csv.DictWriter(line, fieldnames=COLUMNS).writerow(
        {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return line.getvalue()


def run_status(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``{"status": "ok"}``, or ``"failed"`` with the one-line ``failure`` when no round had
    a valid reply or the final model is the starting one (every round changed nothing)."""
    rounds, valid = summary.get("rounds", 0), summary.get("rounds_with_valid_replies", 0)
    why = summary.get("last_problem")
    because = f" (last: {why})" if why else ""
    if summary.get("diverged"):
        d = summary["diverged"]
        return {"status": "failed", "failure": f"round {d['round']} diverged: {d['reason']}; "
                f"the result is the model after round {int(d['round']) - 1}"}
    if rounds and not valid:
        return {"status": "failed", "failure": f"no round had a valid reply in {rounds} "
                f"round{'s' * (rounds != 1)}{because}; the result is the starting model"}
    if rounds and summary.get("model_changed") is False:
        return {"status": "failed", "failure": f"the final model equals the starting model "
                f"after {rounds} round{'s' * (rounds != 1)} ({valid} with valid replies)"
                f"{because}"}
    return {"status": "ok"}


def _final_client_eval(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The last client-side evaluation: ``final_client_eval_*`` (empty when there was none)."""
    done = [r for r in rows if not math.isnan(r.get("client_eval_loss", math.nan))]
    if not done:
        return {}
    last = done[-1]
    return {"final_client_eval_round": last["round"],
            **{f"final_{k}": last[k] for k in CLIENT_EVAL if not math.isnan(last[k])}}


def byte_unit(largest: float) -> tuple[str, float]:
    """The unit a bytes axis reads best in: ``("KiB", 1024)`` below 1 MiB, MiB, or GiB."""
    for name, size in (("KiB", 2**10), ("MiB", 2**20)):
        if largest < 1024 * size:
            return name, float(size)
    return "GiB", float(2**30)


def cumulative_bytes(rows: list[Mapping[str, Any]], directions: tuple[str, ...]
                     ) -> dict[int, float]:
    """Round -> bytes sent so far in ``directions`` (``("up",)`` or ``("up", "down")``)."""
    out, total = {}, 0.0
    for r in rows:
        total += sum(r.get(f"bytes_{d}", 0) for d in directions)
        out[r["round"]] = total
    return out


def plot_curves(rows: list[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy and loss per round; accuracy per byte uploaded and per byte sent (up + down).

    Client-side evaluation, when on, is drawn beside the server's (mean, min-max band).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ev = [r for r in rows if not math.isnan(r["eval_accuracy"])]
    ce = [r for r in rows if not math.isnan(r.get("client_eval_loss", math.nan))]
    ca = [r for r in ce if not math.isnan(r.get("client_eval_accuracy", math.nan))]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (acc, loss), (up, total) = axes
    acc.plot([r["round"] for r in ev], [r["eval_accuracy"] for r in ev], marker=".",
             label="server (test split)")
    if ca:
        x = [r["round"] for r in ca]
        line, = acc.plot(x, [r["client_eval_accuracy"] for r in ca], marker=".",
                         label="clients (weighted mean)")
        acc.fill_between(x, [r["client_eval_accuracy_min"] for r in ca],
                         [r["client_eval_accuracy_max"] for r in ca], alpha=0.2,
                         color=line.get_color(), label="clients (min-max)")
        acc.legend(fontsize=8)
    acc.set(xlabel="round", ylabel="accuracy")
    tr = [r for r in rows if not math.isnan(r["train_loss"])]
    loss.plot([r["round"] for r in ev], [r["eval_loss"] for r in ev], label="eval (server)")
    loss.plot([r["round"] for r in tr], [r["train_loss"] for r in tr], label="train")
    if ce:
        loss.plot([r["round"] for r in ce], [r["client_eval_loss"] for r in ce],
                  label="eval (clients)")
    loss.set(xlabel="round", ylabel="loss")
    loss.legend(fontsize=8)
    for ax, directions, label in ((up, ("up",), "uploaded (clients -> server)"),
                                  (total, ("up", "down"), "sent (up + down)")):
        cum = cumulative_bytes(rows, directions)
        unit, size = byte_unit(max(cum.values(), default=0.0))
        ax.plot([cum[r["round"]] / size for r in ev], [r["eval_accuracy"] for r in ev],
                marker=".")
        ax.set(xlabel=f"{unit} {label}", ylabel="accuracy (server)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    # fixed margins: tight_layout would draw the figure twice (half the plotting time)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.92, wspace=0.22, hspace=0.32)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _num(value: Any) -> float:
    """A summary figure as a float (``None``, as JSON writes NaN: ``nan``)."""
    return math.nan if value is None else float(value)


def format_table(summaries: list[Mapping[str, Any]]) -> str:
    """A markdown table of runs: accuracy (a language model: perplexity, loss, next-token
    accuracy and the generation scores), bytes per round and seconds per round."""
    lm = any((s.get("config") or {}).get("task") == "causal_lm" for s in summaries)
    gen = lm and any(not math.isnan(_num(s.get("final_eval_f1"))) for s in summaries)
    head = ("final ppl | final loss | next-token acc" + (" | exact match | F1" if gen else "")
            if lm else "final acc | best acc")
    lines = [f"| run | {head} | up/round | down/round | s/round | client s/round |",
             "|---|" + "---|" * (head.count("|") + 1) + "---|---|---|---|"]
    for s in summaries:
        if lm:
            ev = (f"{_num(s.get('final_eval_perplexity')):.3f} | "
                  f"{_num(s.get('final_eval_loss')):.4f} | {_num(s['final_accuracy']):.4f}")
            if gen:
                ev += (f" | {_num(s.get('final_eval_exact_match')):.3f} | "
                       f"{_num(s.get('final_eval_f1')):.3f}")
        else:
            ev = f"{s['final_accuracy']:.4f} | {s['best_accuracy']:.4f}"
        lines.append(
            f"| {s['label']} | {ev} | "
            f"{human_bytes(s['bytes_up_per_round'])} | {human_bytes(s['bytes_down_per_round'])} | "
            f"{s['seconds_per_round']:.3f} | {s['client_seconds_per_round']:.3f} |")
    return "\n".join(lines)
