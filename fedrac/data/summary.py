"""The partition summary of a run: samples and label histogram per client, printed and saved.

Files in the run folder: ``partition.json`` (per-client counts, the label-skew
figure), ``partition.csv`` (one row per client) and ``partition.png`` (a heat-map
of labels x clients).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedrac.data.partitioners import label_histograms, label_skew
from fedrac.settings.typed import Settings


def partition_summary(settings: Settings, out_dir: str | Path | None = None,
                      echo: bool = True) -> dict[str, Any]:
    """Summarise the run's partition of the target data; write it to ``out_dir`` when given."""
    from fedrac.data import load_splits

    data, n, seed = settings.data, settings.run.num_clients, settings.run.seed
    task = load_splits(data.dataset)
    hist = label_histograms(data.dataset, data.partitioner, n, seed, task.num_classes)
    sizes = hist.sum(axis=1)
    names = class_names(data.dataset, task)
    summary = {
        "dataset": data.name or data.dataset.get("_target_"),
        "partitioner": data.partitioner.get("name"),
        "num_clients": n, "num_classes": task.num_classes, "class_names": names,
        "input_shape": list(task.input_shape), "seed": seed,
        "samples": int(sizes.sum()),
        "label_skew_tv": round(label_skew(hist), 6),
        "clients": [{"client": i, "samples": int(sizes[i]), "labels": hist[i].tolist()}
                    for i in range(n)],
    }
    if data.task.get("name") == "causal_lm":
        summary.update(token_counts(task.target_train))
        summary["task"] = "causal_lm"
    if echo:
        print(format_summary(summary), flush=True)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from fedrac.atomic import atomic_path, write_json

        write_json(out / "partition.json", summary)
        with atomic_path(out / "partition.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["client", "samples", *(f"label_{c}" for c in range(task.num_classes))])
            for i in range(n):
                w.writerow([i, int(sizes[i]), *hist[i].tolist()])
        plot_heatmap(hist, out / "partition.png",
                     f"{summary['partitioner']} on {summary['dataset']} "
                     f"(label skew TV {summary['label_skew_tv']:.3f})", names)
    return summary


def token_counts(ds: Any) -> dict[str, int]:
    """``sequences``, ``tokens`` and ``loss_tokens`` (those the loss counts) of tokenised rows."""
    table = ds.with_format("arrow")[:]
    lengths = table["input_ids"].combine_chunks().value_lengths().to_numpy()
    loss = int(sum(sum(m) for m in table["loss_mask"].to_pylist())) \
        if "loss_mask" in table.column_names else int(lengths.sum())
    return {"sequences": int(len(lengths)), "tokens": int(lengths.sum()), "loss_tokens": loss}


FULL_TABLE_CLIENTS = 50  # up to this many clients the table lists every client


def class_names(dataset_cfg: Mapping[str, Any], task: Any) -> list[str]:
    """Each class id's name in the source data: the label name (string labels), else the
    source label it was relabelled from (``target_classes``: digits 5-9 for ids 0-4)."""
    n = int(task.num_classes)
    names = getattr(task, "label_names", None)
    if names is not None and len(names) == n:
        return [str(v) for v in names]
    targets = dataset_cfg.get("target_classes")
    if targets is not None and len(targets) == n:
        return [str(names[t]) if names is not None and isinstance(t, int) and 0 <= t < len(names)
                else str(t) for t in targets]
    return [str(names[i]) if names is not None and i < len(names) else str(i) for i in range(n)]


def format_summary(summary: Mapping[str, Any], max_rows: int = FULL_TABLE_CLIENTS) -> str:
    """A short text table: samples and label counts per client, every client up to
    ``max_rows`` of them; beyond, the spread of samples and classes over the clients."""
    c = int(summary["num_classes"])
    clients = summary["clients"]
    if summary.get("task") == "causal_lm":  # no labels: sequences and tokens
        n = max(summary["sequences"], 1)
        lines = [f"partition: {summary['partitioner']} on {summary['dataset']}, causal LM: "
                 f"{summary['sequences']} sequences, {summary['tokens']} tokens "
                 f"({summary['tokens'] / n:.1f} per sequence), loss on "
                 f"{summary['loss_tokens']} tokens, {summary['num_clients']} clients"]
        if len(clients) <= max_rows:
            lines.append("  client  sequences")
            lines += [f"  {row['client']:>6}  {row['samples']:>9}" for row in clients]
        return "\n".join(lines)
    lines = [f"partition: {summary['partitioner']} on {summary['dataset']}, input shape "
             f"{tuple(summary['input_shape'])}, {c} classes, {summary['num_clients']} clients, "
             f"{summary['samples']} samples, label skew (mean TV) {summary['label_skew_tv']:.3f}"]
    names = summary.get("class_names") or [str(k) for k in range(c)]
    if names != [str(k) for k in range(c)]:
        lines.append("  classes: " + ", ".join(f"{k}={v}" for k, v in enumerate(names)))
    if len(clients) > max_rows:
        sizes = np.array([row["samples"] for row in clients])
        present = np.array([sum(1 for v in row["labels"] if v) for row in clients])
        lines.append(f"  samples per client: min {sizes.min()}, median {np.median(sizes):g}, "
                     f"max {sizes.max()}; classes per client: min {present.min()}, median "
                     f"{np.median(present):g}, max {present.max()}; every client in "
                     "partition.csv")
        return "\n".join(lines)
    if c <= 20:
        lines.append("  client  samples  labels " + " ".join(f"{k:>4}" for k in range(c)))
    for row in clients:
        counts = " ".join(f"{v:>4}" for v in row["labels"]) if c <= 20 else ""
        lines.append(f"  {row['client']:>6}  {row['samples']:>7}         {counts}".rstrip())
    return "\n".join(lines)


def plot_heatmap(hist: np.ndarray, path: str | Path, title: str,
                 names: list[str] | None = None) -> None:
    """Save a labels x clients heat-map of ``hist`` (clients x labels counts); rows are
    labelled with ``names`` (the classes' source labels) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c = hist.shape
    # margins in inches (tight_layout would draw the figure twice); room for the class names
    left = 0.45 + 0.07 * max((len(v) for v in names or ["00"]), default=2)
    width, height = min(2 + 0.45 * n, 16) + left - 0.55, min(1.5 + 0.4 * c, 10)
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - 0.8 / width, bottom=0.5 / height,
                        top=1 - 0.3 / height)
    im = ax.imshow(hist.T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("client")
    relabelled = names is not None and names != [str(k) for k in range(c)]
    ax.set_ylabel("class (source label)" if relabelled else "class")
    ax.set_title(title, fontsize=9)
    if n <= 40:
        ax.set_xticks(range(n))
    if c <= 40:
        ax.set_yticks(range(c), labels=names if names is not None else range(c))
    fig.colorbar(im, ax=ax, label="samples")
    if n * c <= 400:  # the counts themselves, readable without the colour scale
        top = float(hist.max()) or 1.0
        for i in range(n):
            for j in range(c):
                ax.text(i, j, str(int(hist[i, j])), ha="center", va="center", fontsize=6,
                        color="black" if hist[i, j] > 0.6 * top else "white")
    from fedrac.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
