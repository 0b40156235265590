"""Runs that fail say so (exit 3), results are never overwritten or half-written, every
config value and Hydra error gives one line, and a sweep survives a bad job."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from fedrac.atomic import atomic_path, jsonable, write_json
from fedrac.run import RunFailedError, run_experiment
from fedrac.server.results import run_status
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
    assert "NaN" not in (tmp_path / "out" / "summary.json").read_text()


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


# --- every config value and Hydra's own errors: one line, exit 2, nothing left behind -------

BAD_VALUES = [
    (["client.momentum=-5"], "client.momentum=-5 is not allowed; allowed: a number in [0, 1)"),
    (["pretrain.lr=-1"], "pretrain.lr=-1 is not allowed; allowed: a number > 0"),
    (["pretrain.optimizer=lion"], "pretrain.optimizer='lion' is not allowed; allowed: sgd, "
                                  "adamw"),
    (["pretrain.epochs=-1"], "pretrain.epochs=-1 is not allowed; allowed: an integer >= 0"),
    (["pretrain.batch_size=0"], "pretrain.batch_size=0 is not allowed; allowed: an integer >= 1"),
    (["strategy.resample_every=0"], "strategy.resample_every=0 is not allowed; allowed: an "
                                    "integer >= 1"),
    (["strategy.resample_every=1.5"], "strategy.resample_every=1.5 is not allowed"),
    (["verbose=maybe"], "verbose='maybe' is not allowed; allowed: true, false"),
    (["overwrite=maybe"], "overwrite='maybe' is not allowed; allowed: true, false"),
    (["client=3"], "client=3 is not allowed; allowed: a mapping of client.* keys"),
    (["strategy.rnak=2"], "strategy.rnak=2 is not a known key; allowed: the keys of strategy: "
                          "alpha, "),  # ... every key of conf/strategy, then:
    (["strategy.rnak=2"], " rank, "),
    (["strategy.rnak=2"], ", train_factor, "),
    (["strategy.rnak=2"], " (did you mean strategy.rank?)"),  # never "+strategy.rnak adds"
    (["+strategy.rnak=4"], "+strategy.rnak=4 adds a key that no code reads; allowed: the keys "
                           "of strategy: alpha, "),
    (["+nokey=1"], "+nokey=1 adds a key that no code reads; allowed: the top-level keys and "
                   "groups: "),
    (["strategy=fedit", "strategy.client_ranks=[1,2]"], " (+strategy.client_ranks=[1,2] adds "
                                                         "it)"),
    (["nokey=1"], "nokey=1 is not a known key; allowed: the top-level keys: aggregation, "
                 "cache_dir, checkpoint_every, client,"),
    (["num_rounds=[1,2"], "'num_rounds=[1,2' is not a valid override (no viable alternative at "
                          "input '[1,2'); allowed: key=value"),
    (["hydra/launcher=nope"], "Could not find 'hydra/launcher/nope'; allowed: basic"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[a[0] for a, _ in BAD_VALUES])
def test_every_bad_value_stops_with_one_line_and_leaves_no_folder(args, message, tmp_path,
                                                                 monkeypatch, capsys):
    from fedrac import cli

    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["fedrac", *args, f"hydra.run.dir={tmp_path}/outputs/d/t"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedrac: error: ") and message in err[0], err[0]
    assert not (tmp_path / "outputs").exists()  # no empty run folder after a failed start
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_hydra_full_error_0_keeps_the_one_line(tmp_path, monkeypatch, capsys):
    from fedrac import cli

    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["fedrac", "strategy.rnak=2",
                                      f"hydra.run.dir={tmp_path}/outputs/d/t"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("fedrac: error: strategy.rnak=2 is not a known")
    assert os.environ["HYDRA_FULL_ERROR"] == "0"  # left as the user set it


# --- results are never overwritten ---------------------------------------------------------

def test_a_folder_holding_a_run_is_refused(tmp_path, monkeypatch, capsys):
    from fedrac import cli

    out = tmp_path / "run1"
    out.mkdir()
    (out / "model.safetensors").write_text("run 1")
    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fedrac", f"output_dir={out}",
                                      f"hydra.run.dir={tmp_path}/outputs/d/t"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedrac: error: output_dir='{out}' is not empty (it holds model.safetensors)"
                   "; allowed: a new or empty folder, overwrite=true (replace its run) or "
                   "resume=<that folder> (continue its run)"]
    assert (out / "model.safetensors").read_text() == "run 1"


def test_output_folder_rules(tmp_path):
    from fedrac.server.outputs import check_output_dir, clear_results, contents
    from fedrac.settings.config import ConfigError

    out = tmp_path / "o"
    check_output_dir({"output_dir": str(out)})  # new
    (out / ".hydra").mkdir(parents=True)
    (out / "fedrac.log").write_text("")
    check_output_dir({"output_dir": str(out)})  # only what Hydra put there
    for name in ("metrics.csv", "summary.json", "notes.txt"):
        (out / name).write_text("old")
    (out / "checkpoint").mkdir()
    with pytest.raises(ConfigError, match="is not empty"):
        check_output_dir({"output_dir": str(out)})
    check_output_dir({"output_dir": str(out), "overwrite": True})
    check_output_dir({"output_dir": str(out), "resume": str(out)})  # resume checks it itself
    clear_results(out)  # overwrite=true: the old run's files go, nothing else
    assert contents(out) == ["notes.txt"]


def test_a_sweep_job_with_a_fixed_output_dir_gets_its_own_folder(tmp_path):
    from types import SimpleNamespace

    from hydra.types import RunMode

    from fedrac.server.outputs import job_output_dir

    hc = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(subdir="3_strategy=x"),
                         runtime=SimpleNamespace(output_dir="/h/3"))
    assert job_output_dir(str(tmp_path), hc) == str(tmp_path / "3_strategy=x")
    assert job_output_dir(None, hc) == "/h/3"
    hc.mode = RunMode.RUN
    assert job_output_dir(str(tmp_path), hc) == str(tmp_path)


def test_default_folders_of_two_runs_started_together_differ():
    import subprocess

    from omegaconf import OmegaConf

    from fedrac.settings.config import conf_dir

    run_dir = OmegaConf.load(conf_dir() / "config.yaml").hydra.run
    assert "${fedrac.uid:}" in run_dir._get_node("dir")._value()
    for path in [conf_dir() / "config.yaml", *sorted((conf_dir() / "experiment").glob("*.yaml"))]:
        dirs = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("dir: ")]
        assert all("${fedrac.uid:}" in ln for ln in dirs), path  # run and sweep folders
    probe = ("import fedrac.settings.config; from omegaconf import OmegaConf; "
             "print(OmegaConf.create({'d': 't-${fedrac.uid:}'}).d)")
    names = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip() for _ in range(2)]
    assert names[0] != names[1] and all(len(n.split("-")[-1]) >= 4 for n in names)


# --- sweeps: identical jobs once, a bad job fails alone ------------------------------------

def test_identical_jobs_are_the_ones_whose_strategy_ignores_the_difference(tmp_path):
    from fedrac.settings.sweep import identity

    def key(*overrides: str) -> str:
        return identity(run_config(tmp_path, "num_rounds=1", *overrides))

    assert key("strategy=fedavg", "strategy.rank=1") == key("strategy=fedavg", "strategy.rank=4")
    assert key("strategy=rac_lora", "strategy.rank=1") != key("strategy=rac_lora",
                                                              "strategy.rank=4")
    assert key("strategy=fedavg", "client.lr=0.1") != key("strategy=fedavg", "client.lr=0.2")
    assert key("strategy=fedit", "strategy.resample_every=1") == key(
        "strategy=fedit", "strategy.resample_every=3")


def test_the_comparison_lists_failed_jobs(tmp_path):
    from fedrac.experiments.comparison import write_comparison

    job = tmp_path / "0_client.lr=1e30"
    write_json(job / "failure.json", {"status": "failed", "failure": "no round had a valid reply",
                                      "overrides": ["client.lr=1e30"]})
    text = write_comparison(tmp_path)
    assert "- 0_client.lr=1e30 (client.lr=1e30): status: failed, no round had a valid reply" \
        in text
    assert "failed" in (tmp_path / "comparison.csv").read_text()


def _fedrac(tmp_path, *args: str):
    from tests.test_cli import fedrac

    return fedrac(*args, env={**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache")})


@pytest.mark.slow
def test_a_sweep_runs_each_distinct_job_once_each_in_its_own_sub_folder(tmp_path):
    out, sweep = tmp_path / "o", tmp_path / "sw"
    proc = _fedrac(tmp_path, "-m", "strategy=fedavg,rac_lora", "strategy.rank=1,2",
                   "num_rounds=1", "num_clients=2", f"output_dir={out}",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs, 1 identical to another" in proc.stdout
    summaries = sorted(out.glob("*/summary.json"))
    assert [p.parent.name[0] for p in summaries] == ["0", "2", "3"]  # job 1 = job 0: skipped
    assert [json.loads(p.read_text())["strategy"] for p in summaries] == \
        ["fedavg", "rac_lora", "rac_lora"]
    assert (out / "comparison.md").is_file()
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # no empty Hydra job folders


@pytest.mark.slow
def test_a_sweep_survives_a_failing_job_and_exits_non_zero(tmp_path):
    sweep = tmp_path / "sw"
    proc = _fedrac(tmp_path, "-m", "client.lr=1e30,0.05", "num_rounds=1", "num_clients=2",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "fedrac: error: 1 job of the sweep failed: job 0 (client.lr=1e+30 ")
    ok = json.loads(next(sweep.glob("1_*/summary.json")).read_text())
    assert ok["status"] == "ok"  # the job after the failed one ran
    text = (sweep / "comparison.md").read_text()
    assert "status: failed, no round had a valid reply in 1 round" in text


@pytest.mark.slow
def test_every_job_of_a_sweep_is_checked_before_the_first_starts(tmp_path):
    sweep = tmp_path / "sw"
    proc = _fedrac(tmp_path, "-m", "strategy.rank=1,9,0", "num_rounds=1",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == [
        "fedrac: error: job 1 (strategy.rank=9 num_rounds=1): strategy.rank=9 is larger than "
        "layer 'head' (64->5) allows; allowed: 1..5 (or exclude the layer from "
        "model.target_modules)",
        "fedrac: error: job 2 (strategy.rank=0 num_rounds=1): strategy.rank=0 is not allowed; "
        "allowed: an integer >= 1",
        "fedrac: error: 2 of 3 jobs cannot run; nothing was started"]
    assert not sweep.exists()


def test_failures_of_jobs_run_elsewhere_are_read_from_their_folders(tmp_path):
    from omegaconf import OmegaConf

    from fedrac.settings import sweep

    write_json(tmp_path / "1_x=2" / "failure.json", {"status": "failed", "failure": "boom",
                                                     "overrides": ["x=2"]})
    (tmp_path / "0_x=1").mkdir()
    sweep._STATE["failed"] = []
    cfg = OmegaConf.create({"output_dir": None, "hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweep.SweepGuard().on_multirun_end(cfg)
    assert sweep.failed_jobs() == ["1_x=2 (x=2): boom"]
    sweep._STATE["failed"] = []
