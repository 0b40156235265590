"""The README's ``_target_`` dataset and model example, run through the CLI as written there."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Bring your own data and model"


def _readme_example() -> tuple[dict[str, str], list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    files = {m.group(1): m.group(0).split("\n", 1)[1]
             for m in re.finditer(r"^# (my_\w+\.py)\n.*?(?=^```)", section, re.S | re.M)}
    command = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S)
                   if "dataset=custom" in b)
    return files, shlex.split(command.replace("\\\n", " "))


@pytest.mark.slow
def test_readme_target_dataset_and_model_run_through_the_cli(tmp_path):
    files, argv = _readme_example()
    assert set(files) == {"my_data.py", "my_model.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    assert argv[0] == "PYTHONPATH=." and argv[1] == "fedrac"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
           "FEDRAC_CACHE": str(tmp_path / "cache"), "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedrac", *argv[2:], f"output_dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "input shape (2,), 2 classes, 4 clients, 300 samples" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.5
    partition = json.loads((out / "partition.json").read_text())
    assert [c["samples"] for c in partition["clients"]] == [75, 75, 75, 75]
    assert (out / "partition.png").is_file() and (out / "partition.csv").is_file()
