"""The multirun comparison: mean ± std over seeds, gap to FPFT, rounds/bytes to a target."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedrac.experiments.comparison import write_comparison
from fedrac.settings.config import ConfigError, validate

BYTES = 1000  # bytes up and down per round in every fake run


def _fake_run(root: Path, name: str, overrides: list[str], strategy: str, accs: list[float],
              target=None) -> None:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"target_accuracy": target}), d / ".hydra" / "config.yaml")
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "eval_accuracy", "bytes_up", "bytes_down"])
        w.writeheader()
        for rnd, acc in enumerate(accs):
            w.writerow({"round": rnd, "eval_accuracy": acc, "bytes_up": BYTES if rnd else 0,
                        "bytes_down": BYTES if rnd else 0})
    summary = {"strategy": strategy, "best_accuracy": max(accs), "bytes_up_per_round": BYTES,
               "bytes_down_per_round": BYTES,
               "bytes_by_kind": {"up": {"factors": BYTES}, "down": {"weights": BYTES}}}
    (d / "summary.json").write_text(json.dumps(summary))


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_comparison_groups_seeds_and_measures_gap_and_target(tmp_path):
    fpft = {0: [0.5, 0.9, 0.95], 1: [0.5, 0.8, 0.97]}
    rac = {0: [0.5, 0.6, 0.94], 1: [0.5, 0.7, 0.90]}
    for seed in (0, 1):
        _fake_run(tmp_path, f"f{seed}", ["strategy=fedavg", f"seed={seed}"], "fedavg",
                  fpft[seed], target="fpft-0.04")
        _fake_run(tmp_path, f"r{seed}", ["strategy=rac_lora", f"seed={seed}"], "rac_lora",
                  rac[seed], target="fpft-0.04")
    text = write_comparison(tmp_path)
    table = {r["group"]: r for r in _rows(tmp_path / "comparison.csv")}
    rac_row = table["strategy=rac_lora"]
    assert rac_row["seeds"] == "2"
    assert rac_row["final"] == "0.9200 ± 0.0283"
    assert math.isclose(float(rac_row["final_mean"]), 0.92)
    assert rac_row["gap_to_fpft"] == "0.0400 ± 0.0424"
    # target = mean FPFT final (0.96) - 0.04 = 0.92: rac seed 0 reaches it in round 2, seed 1 never
    assert rac_row["rounds_to_target"] == ""
    assert table["strategy=fedavg"]["rounds_to_target"] == "2.0"
    assert float(table["strategy=fedavg"]["bytes_to_target"]) == 2 * 2 * BYTES
    assert float(table["strategy=fedavg"]["bytes_up_to_target"]) == 2 * BYTES
    per_round = [r for r in _rows(tmp_path / "comparison_rounds.csv")
                 if r["group"] == "strategy=rac_lora" and r["seed"] == "1"]
    assert [round(float(r["gap_to_fpft"]), 6) for r in per_round] == [0.0, 0.1, 0.07]
    assert "| strategy=rac_lora | 2 | 0.9200 ± 0.0283 |" in text
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "comparison.md").read_text().startswith("| run |")


def test_fedavg_is_not_labelled_with_the_rank_it_ignores(tmp_path):
    for rank in (1, 4):
        _fake_run(tmp_path, f"f{rank}", ["strategy=fedavg", f"strategy.rank={rank}", "seed=0"],
                  "fedavg", [0.5, 0.9])
        _fake_run(tmp_path, f"r{rank}", ["strategy=rac_lora", f"strategy.rank={rank}",
                                         "seed=0"], "rac_lora", [0.5, 0.8 + rank / 100])
    write_comparison(tmp_path)
    groups = {r["group"]: r["seeds"] for r in _rows(tmp_path / "comparison.csv")}
    assert groups == {"strategy=fedavg": "1", "strategy=rac_lora strategy.rank=1": "1",
                      "strategy=rac_lora strategy.rank=4": "1"}


def test_paper_table_pivots_arms_and_settings(tmp_path):
    for i, (arm, acc) in enumerate([("fpft", 0.98), ("rac_lora_B", 0.91), ("rac_lora_A", 0.95),
                                    ("fed_sb_r5", 0.5)]):  # not in the paper: left out
        _fake_run(tmp_path, f"run{i}", ["+setting=central", f"+arm={arm}", "seed=0"],
                  {"fpft": "fedavg", "fed_sb_r5": "fed_sb"}.get(arm, "rac_lora"), [0.2, acc])
    text = write_comparison(tmp_path)
    assert "| RAC-LoRA | 91.0 ± 0.0 | 95.0 ± 0.0 | 92.0 | 96.1 |" in text
    assert "| FPFT | 98.0 ± 0.0 | 98.0 ± 0.0 | 98.0 | 98.0 |" in text
    other = tmp_path / "minilm"  # rank arms (rac_lora_r4): not the paper's protocol, no pivot
    for i, arm in enumerate(["fpft", "rac_lora_r4"]):
        _fake_run(other, f"run{i}", ["+setting=central", f"+arm={arm}", "seed=0"],
                  "fedavg" if arm == "fpft" else "rac_lora", [0.2, 0.9])
    assert "paper" not in write_comparison(other)


@pytest.mark.parametrize("value", [1.5, "fpft", "half"])
def test_bad_target_accuracy_stops_with_one_line(value):
    from hydra import compose, initialize_config_dir

    from fedrac.settings.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=["engine=inline"])
    cfg.target_accuracy = value
    with pytest.raises(ConfigError, match=r"^target_accuracy=.* is not allowed; allowed: null"):
        validate(cfg)


@pytest.mark.slow
def test_a_cli_multirun_writes_the_comparison(tmp_path):
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FEDRAC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "fedrac", "+experiment=theory_quadratic", "num_rounds=5",
         "client.local_steps=1", "num_clients=2", "strategy=fedavg,ffa_lora",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    # quiet: no Flower INFO lines, no digits loaded (the toy never uses them)
    lines = (out.stdout + out.stderr).splitlines()
    assert not [x for x in lines if "[flwr]" in x or "INFO" in x and "HYDRA" not in x], lines[:5]
    assert "dataset: input shape" not in out.stdout + out.stderr and len(lines) < 40
    table = {r["strategy"]: r for r in _rows(tmp_path / "sweep" / "comparison.csv")}
    assert set(table) == {"fedavg", "ffa_lora"}
    assert float(table["fedavg"]["final_mean"]) < float(table["ffa_lora"]["final_mean"])
    assert (tmp_path / "sweep" / "comparison.png").is_file()


def test_comparison_plot_folds_identical_runs_and_drops_shared_overrides(tmp_path):
    from fedrac.experiments.comparison import load_run, plot_comparison, plot_lines

    same = [0.5, 0.9, 0.95]
    for rank in (1, 4):  # FPFT ignores the rank: two identical runs
        _fake_run(tmp_path, f"f{rank}", ["strategy=fedavg", f"strategy.rank={rank}",
                                         "num_rounds=2"], "fedavg", same)
        _fake_run(tmp_path, f"r{rank}", ["strategy=rac_lora", f"strategy.rank={rank}",
                                         "num_rounds=2"], "rac_lora", [0.5, 0.6 + rank / 100,
                                                                       0.9])
    for side in ("A", "B"):
        _fake_run(tmp_path, f"a{side}", [f"+arm=fedit_{side}", "strategy.rank=1", "num_rounds=2"],
                  "fedit", [0.5, 0.55, 0.6])
    runs = [load_run(p) for p in sorted(tmp_path.iterdir())]
    lines, common = plot_lines(runs)
    assert common == ["num_rounds=2"]  # in every run: the title, not the labels
    by = {(ln.method, ln.setting): ln for ln in lines}
    fedavg = [ln for ln in lines if ln.method == "fedavg"]
    assert len(fedavg) == 1 and fedavg[0].same == ["strategy.rank=1", "strategy.rank=4"]
    assert ("rac_lora", "strategy.rank=1") in by and ("rac_lora", "strategy.rank=4") in by
    # arms of one method family share a panel, told apart by colour
    assert {ln.family for ln in lines if ln.method.startswith("fedit")} == {"fedit"}
    plot_comparison(runs, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_partition_plot_names_the_source_labels(tmp_path):
    from fedrac.data import load_splits
    from fedrac.data.summary import class_names

    digits = {"name": "digits", "source_classes": [0, 1, 2, 3, 4],
              "target_classes": [5, 6, 7, 8, 9]}
    assert class_names(digits, load_splits(digits)) == ["5", "6", "7", "8", "9"]
    everything = {"name": "digits", "source_classes": None, "target_classes": None}
    assert class_names(everything, load_splits(everything)) == [str(i) for i in range(10)]
