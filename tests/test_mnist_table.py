"""The packaged mnist_table experiment end to end on tiny MNIST-format IDX files."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _tiny_mnist(root: Path) -> None:
    """Class-dependent blobs so the task is learnable: class c lights row block c."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 100)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 3, :] = 255
        _idx(raw / f"{split}-images-idx3-ubyte", x)
        _idx(raw / f"{split}-labels-idx1-ubyte", y)


def _run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrac", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mnist_table_runs_on_tiny_idx_files(tmp_path):
    _tiny_mnist(tmp_path / "data")
    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    proc = _run("+experiment=mnist_table", f"dataset.root={tmp_path / 'data'}", "num_rounds=3",
                "+setting=iid10", "+arm=fpft,rac_lora_B", "seed=0", "pretrain.epochs=3",
                f"hydra.sweep.dir={sweep}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert sorted(s["strategy"] for s in summaries) == ["fedavg", "rac_lora"]
    assert all(s["rounds"] == 3 and 0 <= s["final_accuracy"] <= 1 for s in summaries)
    assert (sweep / "comparison.md").is_file()


def test_mnist_table_without_files_names_what_is_missing(tmp_path):
    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache")}
    proc = _run("+experiment=mnist_table", f"dataset.root={tmp_path}", "+setting=central",
                "+arm=fpft", "seed=0", f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env)
    assert proc.returncode != 0
    assert "lacks the mnist files train-images-idx3-ubyte" in proc.stderr
