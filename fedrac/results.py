"""Run results: metrics.csv (a row per round, flushed as it goes), summary.json,
model.safetensors, curves.png, and the progress line and final table."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedrac.ledger import ByteLedger

KINDS = ("weights", "factors", "residual", "deltas", "seeds", "config", "metrics", "secagg")
COLUMNS = (
    ["round", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "seconds",
     "client_seconds", "clients", "failed", "rejected", "epsilon", "clip_norm",
     "secagg_error_bound"]
    + [f"bytes_{d}_{k}" for d in ("up", "down") for k in KINDS]
)


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KB'`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class RunRecorder:
    """Writes one run's results into ``output_dir`` as the rounds go by."""

    def __init__(self, output_dir: str | Path, cfg: Mapping[str, Any], ledger: ByteLedger,
                 round_metrics: Mapping[int, Mapping[str, float]], num_rounds: int,
                 privacy: Mapping[str, Any] | None = None) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.ledger, self.round_metrics = cfg, ledger, round_metrics
        self.num_rounds = num_rounds
        self.privacy = dict(privacy) if privacy else None  # resolved settings (fedrac.privacy)
        self.secagg: dict[str, Any] | None = None  # SecAgg+ per-round figures (fedrac.secagg)
        self._privacy_last = {"epsilon": 0.0 if self.privacy else math.nan,
                              "clip_norm": (self.privacy or {}).get("clip_norm", math.nan)}
        self.rows: list[dict[str, Any]] = []
        self._t0 = self._last = time.perf_counter()
        self._csv = (self.dir / "metrics.csv").open("w", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=COLUMNS)
        self._writer.writeheader()

    def log_round(self, server_round: int, eval_loss: float, eval_accuracy: float) -> dict:
        """Record a finished round (``nan`` where it was not evaluated) and print progress."""
        now = time.perf_counter()
        m = self.round_metrics.get(server_round, {})
        row: dict[str, Any] = {
            "round": server_round, "train_loss": m.get("train_loss", math.nan),
            "eval_loss": eval_loss, "eval_accuracy": eval_accuracy,
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
        self._last = now
        self.rows.append(row)
        self._writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                               for k, v in row.items()})
        self._csv.flush()
        print(self.progress_line(row), flush=True)
        return row

    def progress_line(self, row: Mapping[str, Any]) -> str:
        """``[round 3/100] acc 0.8123 loss 0.5234 | train 0.61 | up 3.1 KB down 402 KB | ...``"""
        acc = row["eval_accuracy"]
        ev = "acc   -    loss   -   " if math.isnan(acc) else \
            f"acc {acc:.4f} loss {row['eval_loss']:.4f}"
        tl = row["train_loss"]
        train = "-" if math.isnan(tl) else f"{tl:.4f}"
        width = len(str(self.num_rounds))
        return (f"[round {row['round']:>{width}}/{self.num_rounds}] {ev} | train {train} | "
                f"up {human_bytes(row['bytes_up'])} down {human_bytes(row['bytes_down'])} | "
                f"{row['seconds']:.2f} s (clients {row['client_seconds']:.2f} s)")

    def finish(self, final_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Write summary.json, model.safetensors and curves.png; return the summary."""
        self._csv.close()
        save_file({k: v.detach().cpu().contiguous() for k, v in final_state.items()},
                  str(self.dir / "model.safetensors"))
        summary = self.summary()
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        plot_curves(self.rows, self.dir / "curves.png", title=summary["label"])
        return summary

    def summary(self) -> dict[str, Any]:
        """Final and best accuracy, totals of bytes and seconds, the key config choices."""
        evaluated = [r for r in self.rows if not math.isnan(r["eval_accuracy"])]
        rounds = [r for r in self.rows if r["round"] > 0]
        best = max(evaluated, key=lambda r: r["eval_accuracy"], default=None)
        final = evaluated[-1] if evaluated else None
        totals = self.ledger.totals()
        s = self.cfg["strategy"]
        label = s["name"] + (f" r={s['rank']}" if s["name"] != "fedavg" and "rank" in s else "")
        n = max(len(rounds), 1)
        target = self.cfg.get("target_accuracy")
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
            "initial_accuracy": self.rows[0]["eval_accuracy"] if self.rows else math.nan,
            "final_accuracy": final["eval_accuracy"] if final else math.nan,
            "final_eval_loss": final["eval_loss"] if final else math.nan,
            "best_accuracy": best["eval_accuracy"] if best else math.nan,
            "best_round": best["round"] if best else None,
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
                **{k: v for k, v in dict(self.cfg.get("secagg") or {}).items()},
                "error_bound_max": max((r["error_bound"] for r in self.secagg["rounds"]),
                                       default=math.nan),
                "seconds_per_round": sum(r["seconds"] for r in self.secagg["rounds"])
                / max(len(self.secagg["rounds"]), 1)},
            "config": {
                "strategy": dict(s), "dataset": self.cfg["dataset"].get("name"),
                "model": self.cfg["model"].get("name", self.cfg["model"].get("_target_")),
                "partitioner": dict(self.cfg["partitioner"]),
                "engine": self.cfg["engine"]["name"], "num_clients": self.cfg["num_clients"],
                "fraction_train": self.cfg["fraction_train"], "num_rounds": self.cfg["num_rounds"],
                "seed": self.cfg["seed"], "device": self.cfg["device"],
                "client": dict(self.cfg["client"]),
            },
        }


def plot_curves(rows: list[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy and loss per round, and accuracy per cumulative byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in rows if not math.isnan(r["eval_accuracy"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["round"] for r in ev], [r["eval_accuracy"] for r in ev], marker=".")
    axes[0].set(xlabel="round", ylabel="eval accuracy")
    tr = [r for r in rows if not math.isnan(r["train_loss"])]
    axes[1].plot([r["round"] for r in ev], [r["eval_loss"] for r in ev], label="eval")
    axes[1].plot([r["round"] for r in tr], [r["train_loss"] for r in tr], label="train")
    axes[1].set(xlabel="round", ylabel="loss")
    axes[1].legend()
    cum, total = {}, 0
    for r in rows:
        total += r["bytes_up"] + r["bytes_down"]
        cum[r["round"]] = total / 2**20
    axes[2].plot([cum[r["round"]] for r in ev], [r["eval_accuracy"] for r in ev], marker=".")
    axes[2].set(xlabel="MB sent (up + down)", ylabel="eval accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    # fixed margins: tight_layout would draw the figure twice (half the plotting time)
    fig.subplots_adjust(left=0.055, right=0.99, bottom=0.15, top=0.88, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(summaries: list[Mapping[str, Any]]) -> str:
    """A markdown table of runs: accuracy, bytes per round and seconds per round."""
    lines = ["| run | final acc | best acc | up/round | down/round | s/round | client s/round |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s['label']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
            f"{human_bytes(s['bytes_up_per_round'])} | {human_bytes(s['bytes_down_per_round'])} | "
            f"{s['seconds_per_round']:.3f} | {s['client_seconds_per_round']:.3f} |")
    return "\n".join(lines)
