"""Foundation-model cost: fedrac against the plain PEFT loop a user would write.

Workload (issue 19): a random-weight LLaMA built with transformers (hidden 1536, 4 layers,
intermediate 4096, ~113 M parameters), ``task=causal_lm``, ``strategy=rac_lora strategy.rank=8``
on all seven projections, batch 8 x 64 tokens, 4 local steps, 1 client and 1 round; the plain
loop is ``get_peft_model`` with ``lora_A`` frozen and ``lora_B`` trained, AdamW and gradient
clipping, the same steps, and the same 32 held-out rows evaluated before and after (as
fedrac's server evaluates rounds 0 and 1). Each point runs in its own process (peak RSS is
per process): ``python -m bench.foundation fedrac VARIANT CLIENTS DIR`` / ``... peft VARIANT
DIR`` print JSON. Variants: ``fp32``, ``bf16`` (the frozen base in bfloat16), ``nf4`` (a 4-bit
base). ``--quick`` (tests): hidden 128.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, STEPS, BATCH, TOKENS, LR = 8, 16.0, 4, 8, 64, 2e-3
EVAL_ROWS = 32  # held-out rows each system evaluates before and after training
VARIANTS = ("fp32", "bf16", "nf4")


def build(folder: Path, quick: bool) -> dict[str, Path]:
    """The random LLaMA checkpoint (with the tests' word-level tokenizer) and its data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests import hf_models as H

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / ("llama-quick" if quick else "llama-1536x4")
    if not (ckpt / "config.json").exists():
        tok, _ = H.build_tokenizer(ckpt, "llama")
        hidden, inter = (128, 256) if quick else (1536, 4096)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=4, num_attention_heads=12 if not quick else 4,
                          num_key_value_heads=12 if not quick else 4,
                          max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(str(ckpt))
    data = folder / "long_qa.jsonl"  # prompts of TOKENS - 8 words: the answer fits
    test = folder / "long_qa_test.jsonl"  # evaluated before and after, by both systems
    if not test.exists():
        rng = random.Random(0)
        rows = [{"prompt": " ".join(rng.choices(H.WORDS, k=TOKENS - 8)), "response": "blue"}
                for _ in range(1200 + EVAL_ROWS)]
        H.write_jsonl(data, rows[:1200])
        H.write_jsonl(test, rows[1200:])
    return {"ckpt": ckpt, "data": data, "test": test}


def _variant(variant: str) -> list[str]:
    return {"fp32": [], "bf16": ["model.dtype=bfloat16"],
            "nf4": ["model.quantization=nf4"]}[variant]


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_seconds": ru.ru_utime + ru.ru_stime}


def fedrac_point(variant: str, clients: int, folder: Path, quick: bool) -> dict[str, Any]:
    """One fedrac run of the workload (``clients`` clients, 1 round; with 100 clients each
    takes one step)."""
    import contextlib
    import csv
    import io

    from bench.common import compose_cfg
    from bench.point import peak_rss_mib
    from fedrac.run import run_experiment

    paths = build(folder, quick)
    out = folder / f"fedrac-{variant}-{clients}-{time.time_ns()}"
    steps = STEPS if clients == 1 else 1
    cfg = compose_cfg(
        "model=hf", f"model.path={paths['ckpt']}", "dataset=files",
        f"dataset.path={paths['data']}", f"dataset.test_path={paths['test']}",
        "dataset.prompt_column=prompt",
        "dataset.response_column=response", f"dataset.max_length={TOKENS}", "task=causal_lm",
        "partitioner=iid", f"num_clients={clients}", "num_rounds=1", "strategy=rac_lora",
        f"strategy.rank={RANK}", f"strategy.alpha={ALPHA}",
        f"model.target_modules=[{','.join(TARGETS)}]", f"client.local_steps={steps}",
        f"client.batch_size={BATCH}", f"client.lr={LR}", "client.warmup_steps=0",
        f"output_dir={out}", f"cache_dir={folder / 'cache'}", "progress=lines",
        *_variant(variant))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_experiment(cfg)
    wall = time.perf_counter() - start
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return {"system": "fedrac", "variant": variant, "clients": clients, "wall_seconds": wall,
            "step_seconds": summary["client_seconds_per_round"] / (steps * clients),
            "peak_rss_mib": peak_rss_mib(), "bytes_down": int(rows[-1]["bytes_down"]),
            "bytes_up": int(rows[-1]["bytes_up"]),
            "export_seconds": summary.get("export", {}).get("seconds"), **_usage()}


def peft_point(variant: str, folder: Path, quick: bool) -> dict[str, Any]:
    """The plain PEFT loop on the same model, data and steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

    from bench.point import peak_rss_mib

    paths = build(folder, quick)
    start = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if variant == "bf16":
        kwargs["dtype"] = torch.bfloat16
    if variant == "nf4":
        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
            device_map="cpu")
    model = LlamaForCausalLM.from_pretrained(str(paths["ckpt"]), **kwargs)
    model.config.use_cache = False
    for module in model.modules():  # as fedrac does (fedrac.adapters.quantized): on a CPU
        # with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its bf16 inference
        # kernel at the first evaluation, and that kernel has no backward -- the training
        # after it gets no gradient through the base layers (tests/test_quantized.py)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_B." in name)
    tok = AutoTokenizer.from_pretrained(str(paths["ckpt"]))
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [json.loads(line) for line in paths["data"].read_text().splitlines()]
    enc = tok([r["prompt"] + " " + r["response"] for r in rows[:STEPS * BATCH]],
              truncation=True, max_length=TOKENS, padding="max_length", return_tensors="pt")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    tests = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    held = tok([r["prompt"] + " " + r["response"] for r in tests], truncation=True,
               max_length=TOKENS, padding="longest", return_tensors="pt")

    @torch.no_grad()
    def evaluate() -> float:  # what fedrac's server does before and after the round
        model.eval()
        loss = float(model(input_ids=held["input_ids"], attention_mask=held["attention_mask"],
                           labels=held["input_ids"]).loss)
        model.train()
        return loss

    evaluate()
    model.train()
    times = []
    for s in range(STEPS):
        t0 = time.perf_counter()
        ids = enc["input_ids"][s * BATCH:(s + 1) * BATCH]
        mask = enc["attention_mask"][s * BATCH:(s + 1) * BATCH]
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    evaluate()
    up = sum(p.numel() * p.element_size() for p in params)
    return {"system": "peft", "variant": variant, "clients": 1,
            "wall_seconds": time.perf_counter() - start,
            "step_seconds": statistics.median(times), "peak_rss_mib": peak_rss_mib(),
            "bytes_down": 0, "bytes_up": up, **_usage()}


def _run(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.foundation", *args], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"bench.foundation {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def foundation_cost(quick: bool, tmp: Path, pairs: int = 2,
                    variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    """Interleaved fedrac / PEFT pairs per variant (medians and ratios), then 1 vs 100
    clients at fp32 (``quick``: fp32 and nf4, 1 vs 10 clients)."""
    flag = ["--quick"] if quick else []
    if quick:
        variants = tuple(v for v in variants if v != "bf16")
    rows = []
    for variant in variants:
        ours, theirs = [], []
        for i in range(pairs):
            order = [("fedrac", ours), ("peft", theirs)]
            for system, sink in (order if i % 2 == 0 else order[::-1]):
                args = [system, variant, *(["1"] if system == "fedrac" else []), str(tmp)]
                sink.append(_run([*args, *flag]))
        row: dict[str, Any] = {"variant": variant}
        for key in ("step_seconds", "peak_rss_mib", "cpu_seconds", "wall_seconds"):
            a = statistics.median(r[key] for r in ours)
            b = statistics.median(r[key] for r in theirs)
            row.update({f"fedrac_{key}": a, f"peft_{key}": b, f"ratio_{key}": a / b})
        row.update({"bytes_down": ours[-1]["bytes_down"], "bytes_up": ours[-1]["bytes_up"],
                    "peft_bytes_up": theirs[-1]["bytes_up"]})
        rows.append(row)
    for clients in (1, 10 if quick else 100):
        point = _run(["fedrac", "fp32", str(clients), str(tmp), *flag])
        rows.append({"variant": "fp32", **point})
    return rows


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.2f} MiB"


def to_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The section's tables: fedrac against the plain PEFT loop, and 1 vs many clients."""
    lines = ["| foundation model (LLaMA 1536x4, rac_lora r=8, 7 projections, batch 8x64, 4 "
             "steps) | step s fedrac / PEFT | peak RSS MiB fedrac / PEFT | CPU s of the run "
             "fedrac / PEFT | bytes down / up per client round (PEFT up) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "ratio_step_seconds" not in r:
            continue
        lines.append(
            f"| {r['variant']} | {r['fedrac_step_seconds']:.2f} / {r['peft_step_seconds']:.2f}"
            f" ({r['ratio_step_seconds']:.2f}x) | {r['fedrac_peak_rss_mib']:.0f} / "
            f"{r['peft_peak_rss_mib']:.0f} ({r['ratio_peak_rss_mib']:.2f}x) | "
            f"{r['fedrac_cpu_seconds']:.1f} / {r['peft_cpu_seconds']:.1f} "
            f"({r['ratio_cpu_seconds']:.2f}x) | {_mib(r['bytes_down'])} / "
            f"{_mib(r['bytes_up'])} ({_mib(r['peft_bytes_up'])}) |")
    lines += ["", "| clients (fp32, 1 round, 1 step each beyond 1 client) | peak RSS MiB | "
              "CPU s |", "|---|---|---|"]
    for r in rows:
        if "clients" in r and "ratio_step_seconds" not in r:
            lines.append(f"| {r['clients']} | {r['peak_rss_mib']:.0f} | "
                         f"{r['cpu_seconds']:.1f} |")
    return lines


def main(argv: list[str]) -> None:
    """``fedrac VARIANT CLIENTS DIR`` / ``peft VARIANT DIR``: one point as JSON;
    ``table [--pairs N]``: the whole section as markdown."""
    quick = "--quick" in argv
    args = [a for a in argv if a != "--quick"]
    if args[0] == "table":
        import tempfile

        pairs = int(args[args.index("--pairs") + 1]) if "--pairs" in args else 2
        with tempfile.TemporaryDirectory() as tmp:
            rows = foundation_cost(quick, Path(tmp), pairs)
        print(json.dumps(rows))
        print("\n".join(to_markdown(rows)))
        return
    if args[0] == "fedrac":
        out = fedrac_point(args[1], int(args[2]), Path(args[3]), quick)
    else:
        out = peft_point(args[1], Path(args[2]), quick)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
