"""``python -m bench [--quick] [--out DIR]``: fedrac's speed, memory and bytes, as ratios.

Sections (each time a median over ``--repeats`` runs in this process, same seeds):
1. overhead: fedrac ``rac_lora`` / ``fedavg`` on the inline engine against the plain
   PyTorch loop doing the identical math (bench/floor.py), Flower's own ``FedAvg`` with
   a minimal ClientApp, and a ``rac_lora`` run's messages alone (bench/anchor.py), on
   the same engine;
2. engines: the same run on Flower's Simulation Runtime (Ray) against inline;
3. scale: 10 / 100 / 1000 clients (fraction 0.1), MLP widths 64 / 512 / 2048 and a small
   ViT (model=vit_tiny): seconds per round and peak RSS, each point in a fresh process;
4. bytes: per round, per direction and kind, for every strategy;
5. pfl: pfl-research's cross-device CIFAR-10 protocol (``+experiment=pfl_cifar10``: 1,000
   users x 50 random 3x32x32 images, cohort 50, 5 SGD steps of batch 10, small CNN),
   fedrac against the plain loop, as in 1;
   then ``engine.batched=true`` against the sequential path on both workloads (and the
   plain loop on the embedded default), printed as ratios;
6. transformer: peak memory of one transformer for 10 and 100 clients (bench/transformer.py);
   foundation: a 113 M LLaMA against the plain PEFT loop (step time, peak RSS, CPU, bytes;
   fp32, bf16, nf4; 1 vs 100 clients; bench/foundation.py, also ``python -m bench.foundation
   table``).
7. peers: the same protocol in pfl-research and BlazeFL, interleaved with fedrac, each run
   in its own process (start-up, s/round, CPU s/round, peak RSS; bench/peers.py).
Writes ``results.json`` and ``results.md`` into ``--out`` (default ``bench/results``; with
``--quick`` a new temporary folder, so a smoke run never overwrites the committed figures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bench.anchor import flower_fedavg, message_exchange
from bench.common import Workload, compose_cfg, states_equal, timed, timed_pair
from bench.floor import plain_loop
from fedrac.engines.inline import set_torch_threads
from fedrac.run import run_experiment
from fedrac.server.results import KINDS
from strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()}")


def _fedrac(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    summary = run_experiment(cfg)
    return summary, load_file(str(Path(cfg["output_dir"]) / "model.safetensors"))


def overhead(base: list[str], rounds: int, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """fedrac, Flower's FedAvg and a run's messages alone against the plain loop, on the
    embedded default workload.

    Each run is paired with a floor run right after it; the ratio is the median of the
    pairs' ratios (robust to load from other processes on a shared machine), with their
    range.
    """
    rows = []
    for strategy in ("rac_lora", "fedavg"):
        cfg = compose_cfg(*base, f"strategy={strategy}", f"num_rounds={rounds}",
                          f"output_dir={tmp / strategy}")
        work = Workload(cfg)
        timed(lambda w=work: plain_loop(w), 1)  # warm-up: first-call costs (lazy imports,
        timed(lambda c=cfg: _fedrac(c), 1)      # allocator) hit neither measured run
        run = timed_pair(lambda c=cfg: _fedrac(c), lambda w=work: plain_loop(w), repeats)
        summary, state = run.result
        rows.append(run.row(f"fedrac {strategy}",
                            identical_to_floor=states_equal(run.floor_result, state),
                            final_accuracy=summary["final_accuracy"]))
        if strategy == "rac_lora":
            alone = timed_pair(lambda w=work: message_exchange(w), lambda w=work: plain_loop(w),
                               repeats)
            rows.append(alone.row("its messages alone (null ClientApp, same records)",
                                  identical_to_floor=None, final_accuracy=None))
        if strategy == "fedavg":
            flwr = timed_pair(lambda w=work: flower_fedavg(w), lambda w=work: plain_loop(w),
                              repeats)
            rows.append(flwr.row("Flower FedAvg (minimal ClientApp)", final_accuracy=None,
                                 identical_to_floor=states_equal(flwr.result, run.floor_result)))
    return rows


def pfl_cifar10(rounds: int, repeats: int, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    """fedrac against the plain loop on pfl-research's CIFAR-10 protocol (DESIGN section 10).

    ``--quick`` shrinks it to 100 users (cohort 5) so that it runs in seconds.
    """
    small = ["num_clients=100", "dataset.target_samples=5000"] if quick else []
    rows = []
    for strategy in ("fedavg", "rac_lora"):
        cfg = compose_cfg("+experiment=pfl_cifar10", *small, f"strategy={strategy}",
                          f"num_rounds={rounds}", f"output_dir={tmp / ('pfl-' + strategy)}")
        work = Workload(cfg)
        warm = {**cfg, "num_rounds": 1}  # one round of each first: first-call costs
        warm_work = work.with_cfg(warm)
        timed(lambda w=warm_work: plain_loop(w), 1)
        timed(lambda c=warm: _fedrac(c), 1)
        run = timed_pair(lambda c=cfg: _fedrac(c), lambda w=work: plain_loop(w), repeats)
        summary, state = run.result
        rows.append(run.row(f"fedrac {strategy}", clients=int(cfg["num_clients"]),
                            cohort=int(int(cfg["num_clients"]) * float(cfg["fraction_train"])),
                            rounds=rounds, seconds_per_round=summary["seconds_per_round"],
                            identical_to_floor=states_equal(run.floor_result, state)))
    return rows


def batched(base: list[str], rounds: int, pfl_rounds: int, repeats: int, quick: bool,
            tmp: Path) -> list[dict[str, Any]]:
    """``engine.batched=true`` against the sequential ClientApp path (interleaved pairs, the
    median of the pairs' ratios), on the embedded default (also against the plain loop) and
    on the pfl protocol; whether the final weights are bit-identical."""
    small = ["num_clients=100", "dataset.target_samples=5000"] if quick else []
    points = [("embedded default", [*base], rounds),
              ("pfl CIFAR-10 protocol", ["+experiment=pfl_cifar10", *small], pfl_rounds)]
    rows = []
    for label, over, n in points:
        for strategy in ("fedavg", "rac_lora"):
            name = f"{label}-{strategy}".replace(" ", "_")
            cfg = compose_cfg(*over, f"strategy={strategy}", f"num_rounds={n}",
                              f"output_dir={tmp / name}")
            cfg_b = {**cfg, "engine": {**cfg["engine"], "batched": True},
                     "output_dir": str(tmp / (name + "-batched"))}
            warm = [{**c, "num_rounds": 1} for c in (cfg, cfg_b)]
            for c in warm:
                timed(lambda c=c: _fedrac(c), 1)
            run = timed_pair(lambda c=cfg_b: _fedrac(c), lambda c=cfg: _fedrac(c), repeats)
            (s_b, state_b), (s_s, state_s) = run.result, run.floor_result
            diff = max(float((state_b[k].double() - state_s[k].double()).abs().max())
                       for k in state_s)
            row = run.row(f"{label}, {strategy}: batched / sequential", rounds=n,
                          s_per_round_batched=s_b["seconds_per_round"],
                          s_per_round_sequential=s_s["seconds_per_round"],
                          identical=states_equal(state_b, state_s), max_abs_diff=diff)
            if label == "embedded default":
                work = Workload(cfg)
                timed(lambda w=work: plain_loop(w), 1)
                floor = timed_pair(lambda c=cfg_b: _fedrac(c), lambda w=work: plain_loop(w),
                                   repeats)
                row["vs_floor"] = floor.ratio
                row["vs_floor_min"], row["vs_floor_max"] = floor.ratio_min, floor.ratio_max
            rows.append(row)
    for r in rows:
        floor = "" if "vs_floor" not in r else (
            f"; batched / plain-PyTorch floor {r['vs_floor']:.2f}x "
            f"({r['vs_floor_min']:.2f}-{r['vs_floor_max']:.2f})")
        same = "bit-identical" if r["identical"] else f"max |diff| {r['max_abs_diff']:.1e}"
        print(f"bench: {r['what']} {_ratio(r)}{floor}; {same}", flush=True)
    return rows


def engines(base: list[str], rounds: int, tmp: Path) -> list[dict[str, Any]]:
    """Seconds per round of the same run on the inline engine and on Ray."""
    rows = []
    for engine in ("inline", "simulation"):
        cfg = compose_cfg(*base, f"engine={engine}", f"num_rounds={rounds}",
                          f"output_dir={tmp / ('engine-' + engine)}")
        seconds, summary = timed(lambda c=cfg: run_experiment(c), 1)
        rows.append({"engine": engine, "seconds": seconds,
                     "seconds_per_round": summary["seconds_per_round"]})
    return rows


def _point(overrides: list[str], subprocess_rss: bool) -> dict[str, Any]:
    if not subprocess_rss:
        from bench.point import measure

        out = measure(overrides)
        out["peak_rss_mib"] = None  # shared with the rest of this process: not meaningful
        return out
    done = subprocess.run([sys.executable, "-m", "bench.point", *overrides], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale(base: list[str], rounds: int, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    """Seconds per round and peak RSS for client counts, widths and the small ViT."""
    points: list[tuple[str, list[str]]] = []
    for n in ((10, 100) if quick else (10, 100, 1000)):
        points.append((f"MLP 64, synthetic 50/client, {n} clients, fraction 0.1",
                       ["dataset=synthetic", f"dataset.target_samples={50 * n}",
                        "partitioner=iid", f"num_clients={n}", "fraction_train=0.1"]))
    for width in ((64,) if quick else (64, 512, 2048)):
        points.append((f"MLP {width}, 10 clients", [f"model.hidden=[{width},{width}]"]))
    vit = ["model=vit_tiny", f"pretrain.epochs={1 if quick else 10}"]
    points.append(("vit_tiny (dim 64, depth 2, patch 4), 10 clients", vit))
    rows = []
    for label, over in points:
        for strategy in ("rac_lora", "fedavg"):
            out = _point([*base, *over, f"strategy={strategy}", f"num_rounds={rounds}",
                          f"output_dir={tmp / 'scale'}"], subprocess_rss=not quick)
            rows.append({"point": label, "strategy": strategy, **out})
    return rows


def bytes_per_round(base: list[str], rounds: int, tmp: Path) -> list[dict[str, Any]]:
    """Mean bytes per round (rounds 2.., steady state) per direction and kind, per strategy."""
    variants = [(name, [f"strategy={name}"]) for name in STRATEGIES]
    variants += [("rac_lora download=delta", ["strategy=rac_lora", "strategy.download=delta"]),
                 ("rac_lora download=delta, fraction 0.3",
                  ["strategy=rac_lora", "strategy.download=delta", "fraction_train=0.3"])]
    rows = []
    for label, over in variants:
        out = tmp / "bytes"
        cfg = compose_cfg(*base, *over, f"num_rounds={rounds}", f"output_dir={out}")
        timed(lambda c=cfg: run_experiment(c), 1)
        with (out / "metrics.csv").open() as f:
            data = [r for r in csv.DictReader(f) if int(r["round"]) >= 2]
        row: dict[str, Any] = {"strategy": label}
        for d in ("up", "down"):
            for k in KINDS:
                row[f"{d}_{k}"] = statistics.mean(float(r[f"bytes_{d}_{k}"]) for r in data)
            row[d] = statistics.mean(float(r[f"bytes_{d}"]) for r in data)
        rows.append(row)
    return rows


def transformer_points(quick: bool, tmp: Path) -> list[dict[str, Any]]:
    """Peak memory for 10 and 100 clients of one transformer, each in a fresh process
    (skipped when transformers is not installed)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    from bench.transformer import transformer_memory

    return transformer_memory(quick, tmp, lambda over: _point(over, subprocess_rss=True))


def _ratio(row: dict[str, Any]) -> str:
    return f"{row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"


def _fmt_b(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,.0f} B"


def to_markdown(res: dict[str, Any]) -> str:
    """The results as markdown tables."""
    lines = [f"Machine: {res['machine']}. Mode: {res['mode']}; {res['rounds']} rounds, "
             f"median of {res['repeats']}; torch threads {res['threads']}; {res['date']}.", ""]
    lines += ["| run (embedded default: digits, 10 clients, inline engine) | seconds | "
              "plain-PyTorch floor | ratio (range over pairs) | same weights as floor |",
              "|---|---|---|---|---|"]
    for r in res["overhead"]:
        same = {True: "yes", False: "no", None: "-"}[r["identical_to_floor"]]
        lines.append(f"| {r['what']} | {r['seconds']:.2f} | {r['floor']:.2f} | "
                     f"{_ratio(r)} | {same} |")
    if res.get("pfl"):
        lines += ["", "| pfl-research CIFAR-10 protocol (random 3x32x32, small CNN, SGD) "
                  "| users | cohort | rounds | seconds | plain-PyTorch floor | ratio (range) "
                  "| same weights |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["pfl"]:
            lines.append(f"| {r['what']} | {r['clients']} | {r['cohort']} | {r['rounds']} | "
                         f"{r['seconds']:.2f} | {r['floor']:.2f} | {_ratio(r)} | "
                         f"{'yes' if r['identical_to_floor'] else 'no'} |")
    if res.get("batched"):
        lines += ["", "| engine.batched=true (inline) | rounds | s/round batched | "
                  "s/round sequential | run time ratio (range) | batched / floor | "
                  "weights |", "|---|---|---|---|---|---|---|"]
        for r in res["batched"]:
            floor = f"{r['vs_floor']:.2f}x" if "vs_floor" in r else "-"
            same = "identical" if r["identical"] else f"max diff {r['max_abs_diff']:.1e}"
            lines.append(f"| {r['what']} | {r['rounds']} | {r['s_per_round_batched']:.3f} | "
                         f"{r['s_per_round_sequential']:.3f} | {_ratio(r)} | {floor} | "
                         f"{same} |")
    if res.get("engines"):
        lines += ["", "| engine (rac_lora, embedded default) | s/round | whole run (s) |",
                  "|---|---|---|"]
        for r in res["engines"]:
            lines.append(f"| {r['engine']} | {r['seconds_per_round']:.3f} | "
                         f"{r['seconds']:.1f} |")
    lines += ["", "| scale point | strategy | s/round | client s/round | peak RSS (MiB) |",
              "|---|---|---|---|---|"]
    for r in res["scale"]:
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['point']} | {r['strategy']} | {r['seconds_per_round']:.3f} | "
                     f"{r['client_seconds_per_round']:.3f} | {rss} |")
    if res.get("peers"):
        from bench.peers import to_markdown as peers_markdown

        lines += ["", *peers_markdown(res["peers"])]
    kinds = [k for k in KINDS if any(r[f"{d}_{k}"] for r in res["bytes"] for d in ("up", "down"))]
    head = " | ".join(f"{d} {k}" for d in ("down", "up") for k in kinds)
    lines += ["", f"| bytes per round (10 clients, rounds 2..) | down | up | down/up | {head} |",
              "|---|---|---|---|" + "---|" * (2 * len(kinds))]
    for r in res["bytes"]:
        cells = " | ".join(_fmt_b(r[f"{d}_{k}"]) for d in ("down", "up") for k in kinds)
        lines.append(f"| {r['strategy']} | {_fmt_b(r['down'])} | {_fmt_b(r['up'])} | "
                     f"{r['down'] / r['up']:.2f} | {cells} |")
    if res.get("transformer"):
        lines += ["", "| transformer, rac_lora r=4, 1 round of 1 step per client | clients | "
                  "s/round | peak RSS (MiB) |", "|---|---|---|---|"]
        for r in res["transformer"]:
            lines.append(f"| {r['model']} | {r['clients']} | {r['seconds_per_round']:.2f} | "
                         f"{r['peak_rss_mib']:.0f} |")
    if res.get("foundation"):
        from bench.foundation import to_markdown as foundation_markdown

        lines += ["", *foundation_markdown(res["foundation"])]
    return "\n".join(lines) + "\n"


def results_dir(out: str | None, quick: bool) -> Path:
    """``--out``; else the committed ``bench/results`` for a full run, or a new temporary
    folder for ``--quick`` (a smoke run must not overwrite the committed figures)."""
    if out is not None:
        path = Path(out)
    elif quick:
        path = Path(tempfile.mkdtemp(prefix="fedrac-bench-quick-"))
    else:
        path = ROOT / "bench" / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``results.json`` / ``results.md``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds, small points only")
    parser.add_argument("--out", default=None,
                        help="where results.json/.md go (default: bench/results, or a new "
                             "temporary folder with --quick)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine comparison")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip pfl-research and BlazeFL (section 6)")
    parser.add_argument("--peer-pairs", type=int, default=None,
                        help="interleaved runs of each system in section 6 (default 3; quick 1)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 100)
    repeats = args.repeats or (1 if args.quick else 5)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    path = os.environ.get("PYTHONPATH", "")  # Ray workers and points import this checkout
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    threads = compose_cfg()["engine"].get("threads", 1) or 1
    set_torch_threads(threads)
    base = ["engine=inline"]
    out = results_dir(args.out, args.quick)
    res: dict[str, Any] = {"machine": machine(), "mode": "quick" if args.quick else "full",
                           "rounds": rounds, "repeats": repeats, "threads": threads,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        res["overhead"] = overhead(base, rounds, repeats, tmp)
        if not (args.quick or args.no_ray):
            res["engines"] = engines(base, min(rounds, 20), tmp)
        res["scale"] = scale(base, 2 if args.quick else 20, args.quick, tmp)
        res["bytes"] = bytes_per_round(base, max(rounds if args.quick else 10, 3), tmp)
        res["pfl"] = pfl_cifar10(1 if args.quick else 10, repeats, args.quick, tmp)
        res["batched"] = batched(base, rounds if args.quick else 20, 1 if args.quick else 5,
                                 repeats, args.quick, tmp)
        res["transformer"] = transformer_points(args.quick, tmp)
        from bench.foundation import foundation_cost

        res["foundation"] = foundation_cost(args.quick, tmp, 1 if args.quick else 2)
        if not args.no_peers:
            from bench.peers import peers

            res["peers"] = peers(args.peer_pairs or (1 if args.quick else 3),
                                 2 if args.quick else 20, args.quick, threads)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (out / "results.md").write_text(md)
    print(md)
    print(f"bench: results in {out}", flush=True)
    return res
