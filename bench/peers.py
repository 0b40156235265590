"""Peers on pfl-research's CIFAR-10 protocol: fedrac against pfl-research and BlazeFL.

``python -m bench.peers [--pairs K] [--rounds N] [--quick]`` (also a section of
``python -m bench``). Every run is its own process, so that start-up and peak memory are
each system's own: fedrac (``fedrac +experiment=pfl_cifar10 strategy=fedavg``),
pfl-research (``bench/peer_scripts/pfl_cifar10.py``, PyPI ``pfl`` 0.6 in fedrac's venv:
``make bench-peers``) and BlazeFL (``bench/peer_scripts/blazefl_cifar10.py`` under
its own Python 3.12 venv, ``make blazefl-venv``; or set ``FEDRAC_BLAZEFL_PYTHON``). A peer
that is not installed is skipped with a note. The peers train on the exact tensors fedrac
trains on (per-user partitions, test split, initial weights), dumped once per benchmark.

The systems run back to back in ``K`` pairs, the order rotated every pair. For each run:
wall seconds from launch to the ``[round 0/N]`` line (start-up: imports, data, model;
fedrac and BlazeFL also evaluate the initial model there), seconds and CPU seconds per
round from the round lines to the ``[round N/N]`` line, and peak resident memory
(``ru_maxrss`` of the process from ``wait4``). Ratios to pfl are taken within each pair;
the table gives their median and range.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "peer_scripts"
BLAZEFL_VENV = ROOT / ".venv-blazefl"
ROUND = re.compile(r"^\[round\s+(\d+)/(\d+)\]")
QUICK = ["num_clients=100", "dataset.target_samples=5000"]  # cohort 5 of 100 users
SYSTEMS = ("fedrac", "pfl", "blazefl")
KEYS = ("startup_s", "s_per_round", "cpu_s_per_round", "peak_rss_mib")


def blazefl_python() -> Path:
    """BlazeFL's interpreter: ``$FEDRAC_BLAZEFL_PYTHON``, else ``.venv-blazefl/bin/python``."""
    return Path(os.environ.get("FEDRAC_BLAZEFL_PYTHON") or BLAZEFL_VENV / "bin" / "python")


def available() -> tuple[list[str], list[str]]:
    """The systems that can run here, and a note for each peer that cannot."""
    systems, notes = ["fedrac"], []
    if importlib.util.find_spec("pfl") is None:
        notes.append("pfl-research skipped: `pfl` is not installed (make bench-peers)")
    else:
        systems.append("pfl")
    py = blazefl_python()
    ok = py.exists() and subprocess.run([str(py), "-c", "import blazefl"],
                                        capture_output=True).returncode == 0
    if ok:
        systems.append("blazefl")
    else:
        notes.append(f"BlazeFL skipped: no Python with blazefl at {py} (make blazefl-venv, or "
                     "set FEDRAC_BLAZEFL_PYTHON)")
    return systems, notes


def dump_workload(overrides: list[str], path: Path) -> dict[str, Any]:
    """Write fedrac's partitions, test split and initial weights of ``overrides`` to ``path``
    (a ``torch.save`` file the peer scripts read); return the protocol's settings."""
    import torch

    from bench.common import Workload, compose_cfg

    cfg = compose_cfg(*overrides)
    work = Workload(cfg)
    xs, ys = [x for x, _ in work.data], [y for _, y in work.data]
    if len({len(y) for y in ys}) == 1:  # equal users: one tensor each, rows are users
        xs, ys = torch.stack(xs), torch.stack(ys)
    torch.save({"x": xs, "y": ys, "test_x": work.test[0], "test_y": work.test[1],
                "num_classes": int(work.model.head.out_features),
                "state": {k: v.clone() for k, v in work.state.items()}}, path)
    c = cfg["client"]
    return {"users": int(cfg["num_clients"]),
            "cohort": int(int(cfg["num_clients"]) * float(cfg["fraction_train"])),
            "eval_every": int(cfg["eval_every"]), "lr": float(c["lr"]),
            "batch": int(c["batch_size"]), "epochs": int(c["local_epochs"]),
            "seed": int(cfg["seed"])}


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run ``argv``; time its ``[round i/N]`` lines; its peak RSS from ``wait4``."""
    start = time.perf_counter()
    marks: list[tuple[float, float | None]] = []
    with log.open("w") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            if ROUND.match(line):
                marks.append((time.perf_counter() - start, _cpu_seconds(proc.pid)))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or len(marks) < 2:
        raise RuntimeError(f"{argv[1]} exited {proc.returncode} after {len(marks)} round "
                           f"lines; see {log}:\n{log.read_text()[-2000:]}")
    rounds = len(marks) - 1
    (t0, c0), (tn, cn) = marks[0], marks[-1]
    deltas = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    return {"startup_s": t0, "s_per_round": (tn - t0) / rounds,
            "median_round_s": statistics.median(deltas),
            "cpu_s_per_round": (cn - c0) / rounds if c0 is not None and cn is not None else None,
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}


def command(system: str, proto: dict[str, Any], overrides: list[str], rounds: int,
            threads: int, data: Path, out: Path) -> list[str]:
    """The command line of one run of ``system``."""
    if system in ("fedrac", "fedrac-baseline"):
        return [sys.executable, "-m", "fedrac", *overrides, f"num_rounds={rounds}",
                f"engine.threads={threads}", f"output_dir={out}"]
    script = {"pfl": SCRIPTS / "pfl_cifar10.py", "blazefl": SCRIPTS / "blazefl_cifar10.py"}
    python = sys.executable if system == "pfl" else str(blazefl_python())
    return [python, str(script[system]), "--data", str(data), "--rounds", str(rounds),
            "--threads", str(threads), "--cohort", str(proto["cohort"]),
            "--eval-every", str(proto["eval_every"]), "--lr", str(proto["lr"]),
            "--batch", str(proto["batch"]), "--epochs", str(proto["epochs"]),
            "--seed", str(proto["seed"]), "--summary", str(out / "summary.json")]


def _final_loss(system: str, out: Path) -> float | None:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = summary.get("final_eval_loss" if system.startswith("fedrac") else "eval_loss")
    return None if value is None else float(value)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def peers(pairs: int, rounds: int, quick: bool, threads: int = 1,
          systems: list[str] | None = None, baseline: Path | None = None) -> dict[str, Any]:
    """Interleaved runs of fedrac and the installed peers; medians, ranges, ratios to pfl.

    ``baseline``: another fedrac checkout (e.g. before a change), run as system
    ``fedrac-baseline`` with this venv.
    """
    found, notes = available()
    systems = [s for s in (systems or found) if s in found]
    if baseline is not None:
        systems.insert(1, "fedrac-baseline")
    if len(systems) < 2:  # nothing to set fedrac beside
        return {"protocol": None, "rows": [], "notes": notes, "runs": {}}
    overrides = ["+experiment=pfl_cifar10", "strategy=fedavg", *(QUICK if quick else [])]
    with tempfile.TemporaryDirectory(prefix="fedrac-peers-") as tmp_dir:
        tmp = Path(tmp_dir)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
               "FLWR_HOME": str(tmp / "flwr-home"),
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FEDRAC_CACHE": str(tmp / "cache")}  # shared by the runs: warm after the dump
        data = tmp / "workload.pt"
        done = subprocess.run([sys.executable, "-m", "bench.peers", "--dump", str(data),
                               *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"dumping the workload failed:\n{done.stderr[-2000:]}")
        proto = json.loads(done.stdout.strip().splitlines()[-1])
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        for i in range(pairs):
            for system in systems[i % len(systems):] + systems[:i % len(systems)]:
                out = tmp / f"{system}-{i}"
                out.mkdir()
                argv = command(system, proto, overrides, rounds, threads, data, out)
                where, run_env = ROOT, env
                if system == "fedrac-baseline":
                    assert baseline is not None
                    where, run_env = baseline, {**env, "PYTHONPATH": str(baseline)}
                run = measure(argv, run_env, where, tmp / f"{system}-{i}.log")
                run["final_loss"] = _final_loss(system, out)
                runs[system].append(run)
    rows = []
    for system, rs in runs.items():
        row: dict[str, Any] = {"system": system, "runs": len(rs)}
        for key in (*KEYS, "median_round_s", "final_loss"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = _spread(values)
        if "pfl" in runs and system != "pfl":
            for key in KEYS:
                ratios = [r[key] / p[key] for r, p in zip(rs, runs["pfl"], strict=True)
                          if r.get(key) and p.get(key)]
                if ratios:
                    row[f"{key}_vs_pfl"] = _spread(ratios)
        rows.append(row)
    return {"protocol": {**proto, "rounds": rounds, "pairs": pairs, "threads": threads},
            "rows": rows, "notes": notes, "runs": runs}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    ratio = row.get(f"{key}_vs_pfl")
    text = f"{fmt.format(v['median'])} ({fmt.format(v['min'])}-{fmt.format(v['max'])})"
    if ratio is not None:
        text += f"; {ratio['median']:.2f}x pfl ({ratio['min']:.2f}-{ratio['max']:.2f})"
    return text


def to_markdown(res: dict[str, Any]) -> list[str]:
    """The peers table (median and range over runs; ratios to pfl over pairs)."""
    p = res["protocol"]
    if p is None:
        return [f"Peers not measured: {'; '.join(res['notes'])}."]
    lines = [f"| peers, pfl protocol ({p['users']} users, cohort {p['cohort']}, {p['rounds']} "
             f"rounds, {p['pairs']} interleaved runs each, {p['threads']} thread) | start-up s "
             "| s/round | CPU s/round | peak RSS MiB | final eval loss |",
             "|---|---|---|---|---|---|"]
    for row in res["rows"]:
        loss = row.get("final_loss")
        lines.append(f"| {row['system']} | {_cell(row, 'startup_s', '{:.1f}')} | "
                     f"{_cell(row, 's_per_round', '{:.2f}')} | "
                     f"{_cell(row, 'cpu_s_per_round', '{:.2f}')} | "
                     f"{_cell(row, 'peak_rss_mib', '{:.0f}')} | "
                     f"{'-' if loss is None else format(loss['median'], '.4f')} |")
    lines += [f"- {note}" for note in res["notes"]]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``python -m bench.peers``: the peers section alone (or ``--dump``, used by it)."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="100 users, cohort 5")
    parser.add_argument("--systems", default=None, help="comma-separated subset of "
                        f"{','.join(SYSTEMS)}")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--baseline", default=None,
                        help="another fedrac checkout to run beside this one (before/after)")
    parser.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.dump:
        print(json.dumps(dump_workload(rest, Path(args.dump))))
        return None
    res = peers(args.pairs, args.rounds, args.quick,
                systems=args.systems.split(",") if args.systems else None,
                baseline=Path(args.baseline).resolve() if args.baseline else None)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print("\n".join(to_markdown(res)))
    return res


if __name__ == "__main__":
    main()
