"""The benchmark runs end to end (``--quick``) and its figures keep their meaning."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_benchmark_runs_and_floor_is_the_same_math(tmp_path, monkeypatch):
    from bench.run import main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    res = main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["mode"] == "quick"
    assert "| fedrac rac_lora |" in (tmp_path / "results.md").read_text()
    by_run = {r["what"]: r for r in res["overhead"]}
    # the floor does the identical math: fedrac's final weights are bit-identical to it
    assert by_run["fedrac rac_lora"]["identical_to_floor"]
    assert by_run["fedrac fedavg"]["identical_to_floor"]
    # a run's messages alone are a part of the run: cheaper than the run itself
    alone = by_run["its messages alone (null ClientApp, same records)"]
    assert 0 < alone["seconds"] < by_run["fedrac rac_lora"]["seconds"]
    assert {r["strategy"] for r in res["scale"]} == {"rac_lora", "fedavg"}
    by_strategy = {r["strategy"]: r for r in res["bytes"]}
    from strategies import STRATEGIES

    assert set(STRATEGIES) <= set(by_strategy)  # every strategy's bytes, per kind
    assert by_strategy["fedex_lora"]["down_residual"] > 0
    assert all(by_strategy[n]["down_residual"] == 0 for n in ("rac_lora", "ffa_lora", "fedit"))
    delta = by_strategy["rac_lora download=delta"]
    assert delta["down_weights"] == 0 and delta["down"] <= 1.1 * delta["up"]
    # pfl-research's protocol (shrunk): partial participation, SGD, CNN -- still the same math
    assert [r["what"] for r in res["pfl"]] == ["fedrac fedavg", "fedrac rac_lora"]
    assert all(r["identical_to_floor"] and r["cohort"] == 5 for r in res["pfl"])
    # batched clients: fedavg on the embedded default gives the sequential path's weights
    by_batched = {r["what"]: r for r in res["batched"]}
    assert by_batched["embedded default, fedavg: batched / sequential"]["identical"]
    # one transformer for 10 and 100 clients: one base model per process, memory about flat
    tf = {r["clients"]: r for r in res["transformer"]}
    assert set(tf) == {10, 100}
    assert tf[100]["peak_rss_mib"] < 1.15 * tf[10]["peak_rss_mib"]


def test_peers_are_skipped_with_a_note_when_absent(monkeypatch, tmp_path):
    from bench import peers

    monkeypatch.setenv("FEDRAC_BLAZEFL_PYTHON", str(tmp_path / "no-python"))
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    res = peers.peers(1, 2, quick=True)
    assert res["rows"] == [] and len(res["notes"]) == 2
    text = "\n".join(peers.to_markdown(res))
    assert "pfl-research skipped" in text and "BlazeFL skipped" in text


def test_quick_results_go_to_a_temporary_folder_unless_out_is_given(tmp_path):
    from bench.run import ROOT, results_dir

    quick = results_dir(None, quick=True)
    assert quick.is_dir() and ROOT not in quick.parents and quick != ROOT / "bench" / "results"
    quick.rmdir()
    assert results_dir(str(tmp_path / "x"), quick=True) == tmp_path / "x"
    assert results_dir(None, quick=False) == ROOT / "bench" / "results"


def test_batching_ceiling_bound(capsys) -> None:
    """``python -m bench.batched --ceiling`` divides per-sample, not per-step, times."""
    from bench.batched import ceiling, speedup_bound

    # 10 ms for one client's 10 samples, 400 ms for 50 clients' 500: 1.0 vs 0.8 ms a sample
    assert speedup_bound(0.010, 10, 0.400, 50) == pytest.approx(1.25)
    ceiling(cohort=3, batch=2, repeats=1)
    assert "at batch 2," in capsys.readouterr().out
