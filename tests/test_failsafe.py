"""Runs that fail say so (exit 3), results are never overwritten or half-written, every
config value and Hydra error gives one line, and a sweep survives a bad job."""

from __future__ import annotations

import json
import math
import os

import pytest

from fedrac.atomic import atomic_path, jsonable, write_json
from fedrac.results import run_status
from fedrac.run import RunFailedError, run_experiment
from tests.helpers import run_config

# --- failures fail ---------------------------------------------------------------------------

def test_a_run_without_a_single_valid_reply_fails_and_says_why(tmp_path):
    cfg = run_config(tmp_path, "num_clients=2", "num_rounds=2", "client.lr=1e30")
    with pytest.raises(RunFailedError, match=r"^no round had a valid reply in 2 rounds \(last: "
                                             r"reply rejected: '.*' has non-finite values\)"):
        run_experiment(cfg)
    out = tmp_path / "out"
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text)  # strict JSON
    assert summary["status"] == "failed" and summary["rounds_with_valid_replies"] == 0
    assert summary["model_changed"] is False
    assert summary["final_eval_perplexity"] is None  # NaN is written as null


def test_a_run_with_valid_replies_is_ok_and_counts_them(tmp_path):
    cfg = run_config(tmp_path, "num_clients=2", "num_rounds=2")
    summary = run_experiment(cfg)
    assert summary["status"] == "ok" and summary["rounds_with_valid_replies"] == 2
    assert summary["model_changed"] is True
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary file left behind


def test_run_status_blames_an_unchanged_model_and_no_valid_round():
    assert run_status({"rounds": 3, "rounds_with_valid_replies": 3,
                       "model_changed": True}) == {"status": "ok"}
    assert run_status({"rounds": 3, "rounds_with_valid_replies": 0})["status"] == "failed"
    unchanged = run_status({"rounds": 3, "rounds_with_valid_replies": 1, "model_changed": False,
                            "last_problem": "node failed: boom"})
    assert unchanged["failure"] == ("the final model equals the starting model after 3 rounds "
                                    "(1 with valid replies) (last: node failed: boom)")


@pytest.mark.slow
def test_cli_exits_3_with_one_line_when_every_reply_is_rejected(tmp_path):
    from tests.test_cli import fedrac

    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache")}
    proc = fedrac("num_rounds=1", "num_clients=2", "client.lr=1e30",
                  f"output_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}", env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedrac: error: no round had a valid reply in 1 round ")


# --- atomic files, strict JSON ---------------------------------------------------------------

def test_json_has_null_for_non_finite_numbers(tmp_path):
    assert jsonable({"a": [math.nan, 1.5, {"b": math.inf}], "c": "x"}) == \
        {"a": [None, 1.5, {"b": None}], "c": "x"}
    write_json(tmp_path / "s.json", {"x": math.nan, "y": -math.inf})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": None, "y": None}


def test_an_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("run 1")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_text("half of run 2")
        raise KeyboardInterrupt
    assert path.read_text() == "run 1" and os.listdir(tmp_path) == ["model.safetensors"]
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors"
        tmp.write_text("run 2")
    assert path.read_text() == "run 2" and os.listdir(tmp_path) == ["model.safetensors"]
