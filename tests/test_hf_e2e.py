"""End-to-end runs with tiny transformers: text classification (BERT) and causal LM (GPT-2,
LLaMA) with rac_lora and fedavg through the CLI, and the export round trip: ``hf_model/``
through transformers and ``adapter/`` through PEFT give fedrac's logits."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import hf_models as H

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max |logit difference| between fedrac's merged model and the exported folders


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_e2e")
    out = {a: H.build_checkpoint(root / a, a) for a in H.ARCHS}
    out["sentiment"] = H.write_csv(root / "sentiment.csv", H.sentiment_rows(160))
    out["qa"] = H.write_jsonl(root / "qa.jsonl", H.qa_rows(60))
    return out


def overrides(ckpt, out: Path, task: str, *extra: str, arch: str | None = None) -> list[str]:
    """The overrides of a small run on the tiny checkpoints."""
    if task == "classification":
        arch = arch or "bert"
        data = [f"dataset.path={ckpt['sentiment']}", "dataset.text_column=text",
                "dataset.max_length=16", "client.lr=0.01"]
    else:
        arch = arch or "gpt2"
        data = [f"dataset.path={ckpt['qa']}", "dataset.prompt_column=prompt",
                "dataset.response_column=response", "dataset.max_length=16",
                "task=causal_lm", "partitioner=iid", "client.lr=0.01"]
    return ["model=hf", f"model.path={ckpt[arch]}", "dataset=files", *data, "num_clients=3",
            "num_rounds=3", "client.local_epochs=1", "client.full_lr=0.002",
            f"output_dir={out}", *extra]


def compose(ckpt, out: Path, task: str, *extra: str, arch: str | None = None) -> dict:
    """The validated config of :func:`overrides`."""
    from bench.common import compose_cfg

    return compose_cfg(*overrides(ckpt, out, task, *extra, arch=arch))


def fedrac(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "FEDRAC_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "fedrac", *args,
                           f"hydra.run.dir={tmp_path / 'h'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "metrics.csv").open()))


def run(args: list[str], tmp_path: Path, cli: bool, capsys) -> str:
    """Run fedrac through the CLI (a subprocess) or in this process; its stdout."""
    if cli:
        proc = fedrac(args, tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout
    from bench.common import compose_cfg
    from fedrac.run import run_experiment

    run_experiment(compose_cfg(*args))
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "cli"), [("rac_lora", True), ("fedavg", False)])
def test_text_classification_cli_learns_and_exports(ckpt, tmp_path, strategy, cli, capsys):
    out = tmp_path / "run"
    stdout = run(overrides(ckpt, out, "classification", f"strategy={strategy}",
                           "strategy.rank=4", "num_rounds=4"), tmp_path, cli, capsys)
    assert "labels: 0=neg, 1=pos" in stdout
    rows = _rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == ["neg", "pos"]
    assert summary["final_accuracy"] >= 0.9 > summary["initial_accuracy"], summary
    up = {k: int(v) for k, v in rows[1].items() if k.startswith("bytes_up_") and int(v)}
    if strategy == "rac_lora":  # factors and the classifier head, each under its own kind
        assert set(up) == {"bytes_up_factors", "bytes_up_modules", "bytes_up_metrics"}
        head = 3 * (2 * 32 + 2) * 4  # 3 clients, classifier 2x32 + bias, float32
        assert head <= up["bytes_up_modules"] < head + 3 * 2 * 200
        assert "adapter/ (PEFT LoRA, rank auto: " in stdout  # export_rank=auto by default
    else:
        assert set(up) == {"bytes_up_weights", "bytes_up_metrics"}
    assert (out / "hf_model" / "config.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file() == (strategy == "rac_lora")


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "arch", "cli"), [("rac_lora", "gpt2", True),
                                                      ("fedavg", "llama", False)])
def test_causal_lm_cli_reports_loss_and_perplexity(ckpt, tmp_path, strategy, arch, cli, capsys):
    out = tmp_path / "run"
    extra = ["dataset.prompt_column=null", "dataset.response_column=null",
             "dataset.text_column=text"] if arch == "llama" else []
    stdout = run(overrides(ckpt, out, "causal_lm", f"strategy={strategy}", "strategy.rank=2",
                           *extra, arch=arch), tmp_path, cli, capsys)
    rows = _rows(out)
    ppl = [float(r["eval_perplexity"]) for r in rows]
    loss = [float(r["eval_loss"]) for r in rows]
    assert all(math.isfinite(p) for p in ppl)
    assert ppl == pytest.approx([math.exp(v) for v in loss], rel=1e-6)
    assert ppl[-1] < ppl[0]
    assert "ppl " in stdout
    assert not cli or "| final ppl | final loss | next-token acc |" in stdout  # the CLI table
    assert "classes" not in stdout  # a language model's data summary counts tokens
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "causal_lm"
    assert summary["final_eval_perplexity"] == pytest.approx(ppl[-1])


def _fedrac_logits(cfg: dict, out: Path, ids: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    from fedrac.data import load_splits
    from fedrac.models import build_model

    splits = load_splits(cfg["dataset"])
    model = build_model(cfg["model"], splits.input_shape, splits.num_classes)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    return model.eval()(input_ids=ids).logits.detach()


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "task"), [("bert", "classification"), ("gpt2", "causal_lm")])
def test_export_round_trip_through_transformers_and_peft(ckpt, tmp_path, arch, task):
    """rac_lora rank 2 over 2 rounds accumulates rank <= 4 per layer: export_rank=auto (the
    default) is exact, from the run's factors; export_rank=1 truncates and says by how much."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedrac.run import run_experiment

    auto = AutoModelForSequenceClassification if task == "classification" else \
        AutoModelForCausalLM
    kwargs = {"num_labels": 2} if task == "classification" else {}
    ids = torch.tensor([[2, 10, 20, 30, 3], [2, 11, 12, 3, 0]]) if arch == "bert" else \
        torch.tensor([[1, 10, 20, 30, 2], [1, 11, 12, 13, 14]])
    errors, gaps = {}, {}
    for rank in ("auto", 1):
        out = tmp_path / f"r{rank}"
        cfg = compose(ckpt, out, task, "strategy=rac_lora", "strategy.rank=2", "num_rounds=2",
                      f"model.export_rank={rank}", arch=arch)
        summary = run_experiment(cfg)
        errors[rank] = summary["export"]["adapter_relative_error"]
        assert summary["export"]["adapter_from_factors"]
        want = _fedrac_logits(cfg, out, ids)
        merged = auto.from_pretrained(str(out / "hf_model")).eval()
        assert (merged(input_ids=ids).logits - want).abs().max() < TOL
        base = auto.from_pretrained(str(ckpt[arch]), **kwargs)
        adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        gaps[rank] = float((adapted(input_ids=ids).logits - want).abs().max())
    assert gaps["auto"] < TOL and gaps[1] > 3 * gaps["auto"], gaps
    assert errors["auto"] < 1e-5 < 0.01 < errors[1] < 1, errors


@pytest.mark.slow
def test_minilm_experiment_config_smoke(tmp_path):
    """``+experiment=text_minilm`` composes and runs one short round (needs the package)."""
    pytest.importorskip("all_minilm_l6_v2")
    pytest.importorskip("chatterbot_corpus")
    from bench.common import compose_cfg
    from fedrac.run import run_experiment

    cfg = compose_cfg("+experiment=text_minilm", "hydra.mode=RUN", "num_rounds=1",
                      "num_clients=2", "strategy=rac_lora", "strategy.rank=4",
                      "client.local_steps=1", "dataset.kwargs.max_rows_per_class=20",
                      f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}")
    summary = run_experiment(cfg)
    assert summary["rounds"] == 1 and 0 <= summary["final_accuracy"] <= 1


@pytest.mark.slow
def test_minilm_dp_compare_config_smoke(tmp_path):
    """``+experiment=dp_compare_text`` composes and runs one noised round (needs the package)."""
    pytest.importorskip("all_minilm_l6_v2")
    pytest.importorskip("chatterbot_corpus")
    from bench.common import compose_cfg
    from fedrac.run import run_experiment

    cfg = compose_cfg("+experiment=dp_compare_text", "hydra.mode=RUN", "num_rounds=1",
                      "strategy=rac_lora", "privacy.target_epsilon=8",
                      "dataset.kwargs.max_rows_per_class=40",
                      f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}")
    summary = run_experiment(cfg)
    assert summary["rounds"] == 1 and 0 < summary["epsilon"] <= 8
