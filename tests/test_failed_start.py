"""A run that stops at start (a config or data error) leaves no output folder behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_failed_start_leaves_no_empty_output_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDRAC_CACHE": str(tmp_path / "cache")}
    (tmp_path / "outputs" / "keep").mkdir(parents=True)  # a folder of the user's stays
    proc = subprocess.run([sys.executable, "-m", "fedrac", "dataset=files",
                           "dataset.path=/nonexistent/x.csv"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fedrac: error: dataset.path='/nonexistent/x.csv' does not exist" in proc.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("*"))
    assert left == ["outputs/keep"]
