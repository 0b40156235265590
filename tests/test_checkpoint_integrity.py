"""A checkpoint carries a checksum and its run's config hash: a damaged checkpoint or another
run's is refused on resume with one line (exit 2), never resumed silently."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrac.server import checkpoint as ck
from fedrac.settings.config import ConfigError
from tests.helpers import run_config

STATE = {"round": 3, "weights": {"w": torch.arange(64, dtype=torch.float32)}, "rng": {}}


def _saved(tmp_path: Path, run_hash: str = "a" * 64) -> Path:
    ck.save_checkpoint(tmp_path, STATE, run_hash)
    return ck.checkpoint_path(tmp_path)


def test_an_intact_checkpoint_of_the_run_loads(tmp_path):
    _saved(tmp_path)
    back = ck.load_checkpoint(tmp_path, "a" * 64)
    assert torch.equal(back["weights"]["w"], STATE["weights"]["w"]) and back["round"] == 3


def test_a_flipped_byte_is_refused(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="its checksum does not match: damaged"):
        ck.load_checkpoint(tmp_path, "a" * 64)


def test_a_truncated_checkpoint_is_refused_with_one_line(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="it is damaged") as err:
        ck.load_checkpoint(tmp_path, "a" * 64)
    assert "\n" not in str(err.value)


def test_another_runs_checkpoint_is_refused(tmp_path):
    _saved(tmp_path, "b" * 64)
    with pytest.raises(ConfigError, match="written by another run: config hash bbbbbbbbbbbb"):
        ck.load_checkpoint(tmp_path, "a" * 64)


def test_config_hash_ignores_what_a_resume_may_change_only():
    cfg = {"seed": 0, "num_rounds": 5, "output_dir": "/a", "strategy": {"name": "rac_lora"}}
    same = {**cfg, "num_rounds": 9, "output_dir": "/b", "resume": "/b"}
    assert ck.config_hash(cfg) == ck.config_hash(same)
    assert ck.config_hash(cfg) != ck.config_hash({**cfg, "seed": 1})


def test_orphan_temp_files_are_removed(tmp_path):
    folder = tmp_path / ck.FOLDER
    folder.mkdir()
    (folder / f".{ck.STATE_FILE}.x1y2.tmp.safetensors").write_bytes(b"half")
    keep = folder / "notes.txt"
    keep.write_text("mine")
    assert ck.remove_orphans(folder) == [f".{ck.STATE_FILE}.x1y2.tmp.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_resume_from_the_cli_refuses_another_runs_checkpoint(tmp_path):
    """Two 1-round runs with other seeds; the second's checkpoint copied into the first."""
    from fedrac.run import run_experiment

    fast = ["num_rounds=1", "num_clients=2", "client.local_steps=1", "pretrain.epochs=1"]
    a = run_config(tmp_path / "a", *fast, "seed=1")
    b = run_config(tmp_path / "b", *fast, "seed=2")
    b["cache_dir"] = a["cache_dir"]
    run_experiment(a)
    run_experiment(b)
    shutil.copy(ck.checkpoint_path(b["output_dir"]), ck.checkpoint_path(a["output_dir"]))
    proc = subprocess.run([sys.executable, "-m", "fedrac", f"resume={a['output_dir']}",
                           "num_rounds=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "written by another run" in errors[0], proc.stderr[-2000:]
