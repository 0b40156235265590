"""4-bit and 8-bit bases (``model.quantization``): exact dense round trip, QLoRA runs that
learn, ``hf_model/`` dense in the compute dtype and ``adapter/`` on the quantised base, and the
refusals."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from tests import hf_models as H

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {"llama": H.build_checkpoint(root / "llama", "llama"),
            "bert": H.build_checkpoint(root / "bert", "bert"),
            "qa": H.write_jsonl(root / "qa.jsonl", H.qa_rows(40)),
            "sentiment": H.write_csv(root / "sentiment.csv", H.sentiment_rows(80))}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dense_state_round_trips_exactly_and_loading_requantises(ckpt, quant):
    """``deQ(Q(W))`` quantises back to the same codes; a changed dense weight changes the
    quantised layer (the client trains on ``Q(W_t)``, not on the first base)."""
    import fedrac.adapters.quantized as Q
    from fedrac.adapters.quantized import dense_state, load_state, quantized_layers
    from fedrac.models.hf import build_hf_model

    model = build_hf_model({"name": "hf", "path": str(ckpt["llama"]), "task": "causal_lm",
                            "quantization": quant}, 2)
    layers = quantized_layers(model)
    assert layers and all(type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                          for m in layers.values())
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    before = model(input_ids=ids).logits.detach()
    state = dense_state(model)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith(".weight"))
    for name, module in layers.items():  # Q(deQ(Q(W))) == Q(W): what lets a load skip it
        codes = module.weight.data.clone()
        Q._requantize(module, state[f"{name}.weight"])
        assert torch.equal(module.weight.data, codes), name
    load_state(model, state)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in dense_state(model).items())
    key = f"{next(iter(layers))}.weight"
    moved = {**state, key: state[key] + 0.5 * state[key].abs().max()}
    load_state(model, moved)
    assert not torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantised_model_does_not_keep_the_checkpoint_mapped(ckpt, quant):
    """transformers leaves the unquantised tensors as views of the memory-mapped checkpoint;
    one such view keeps every page of the dense file the quantisation read resident."""
    import gc
    import os

    from fedrac.models.hf import build_hf_model

    model = build_hf_model({"name": "hf", "path": str(ckpt["llama"]), "task": "causal_lm",
                            "quantization": quant}, 2)
    gc.collect()
    folder = os.path.realpath(ckpt["llama"])
    with open("/proc/self/maps") as maps:
        mapped = [line.split()[-1] for line in maps if folder in line]
    assert not mapped, mapped
    assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.isfinite().all()


def test_requantising_hands_memory_back_while_loading(ckpt, monkeypatch):
    """glibc keeps each layer's freed quantisation temporaries resident: the load trims the
    heap every ``TRIM_BYTES`` of weights, not only at its end; the dense weights are
    dequantised one layer at a time."""
    import fedrac.adapters.quantized as Q
    from fedrac.models.hf import build_hf_model

    model = build_hf_model({"name": "hf", "path": str(ckpt["llama"]), "task": "causal_lm",
                            "quantization": "nf4"}, 2)
    weights = {f"{n}.weight" for n in Q.quantized_layers(model)}
    state = {k: v + 1e-3 if k in weights else v for k, v in Q.dense_state(model).items()}
    trims = []
    monkeypatch.setattr(Q, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(Q, "TRIM_BYTES", 1)
    Q.load_state(model, state)
    assert len(trims) == len(Q.quantized_layers(model)) + 1
    calls = []
    real = Q.dequantize
    monkeypatch.setattr(Q, "dequantize", lambda m: calls.append(1) or real(m))
    items = Q.dense_items(model)
    first_layer = next(k for k, _ in items if k.endswith(".weight") and calls)
    assert first_layer and len(calls) == 1  # lazily, one layer per item


def test_loading_the_same_weights_again_skips_requantising(ckpt, monkeypatch):
    """The server's ``W0`` (the dequantised base) loaded into the freshly built model, and the
    same record loaded again (the server's evaluation, then a client of the same process),
    requantise nothing; a tensor changed in place or a new one is requantised, also when it
    is changed back."""
    import fedrac.adapters.quantized as Q
    from fedrac.models.hf import build_hf_model

    model = build_hf_model({"name": "hf", "path": str(ckpt["llama"]), "task": "causal_lm",
                            "quantization": "nf4"}, 2)
    state = {k: v.clone() for k, v in Q.dense_state(model).items()}  # as from a record
    calls = []
    real = Q._requantize
    monkeypatch.setattr(Q, "_requantize", lambda m, d: calls.append(1) or real(m, d))
    Q.load_state(model, state)
    assert calls == []  # W0 is exactly what the built layers dequantise to
    moved = {k: v + 1e-3 if k in {f"{n}.weight" for n in Q.quantized_layers(model)} else v
             for k, v in state.items()}
    Q.load_state(model, moved)
    first = len(calls)
    assert first == len(Q.quantized_layers(model))
    Q.load_state(model, moved)
    assert len(calls) == first
    Q.load_state(model, {k: v.clone() for k, v in moved.items()})  # rebuilt, equal
    assert len(calls) == first
    Q.load_state(model, state)
    assert len(calls) == 2 * first  # back to W0: requantised (the codes are Q(W0 + 1e-3))
    calls.clear()
    key = f"{next(iter(Q.quantized_layers(model)))}.weight"
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    before = model(input_ids=ids).logits.detach()
    state[key].mul_(3.0)  # in place: the version counter moves
    Q.load_state(model, state)
    assert len(calls) == 1
    assert not torch.equal(model(input_ids=ids).logits, before)
    Q.load_state(model, {**state, key: state[key] / 3.0})  # a new tensor
    assert len(calls) == 2
    assert torch.equal(model(input_ids=ids).logits, before)


def test_training_after_an_evaluation_backpropagates_through_the_base(ckpt):
    """bitsandbytes repacks a 4-bit weight for its bf16 CPU inference kernel at the first
    no-grad forward (on an AVX512-BF16 CPU), and that kernel has no backward: the input
    gradient of a layer trained after an evaluation must still be the dequantised weight's."""
    from fedrac.adapters.quantized import dequantize, quantized_layers
    from fedrac.models.hf import build_hf_model

    model = build_hf_model({"name": "hf", "path": str(ckpt["llama"]), "task": "causal_lm",
                            "quantization": "nf4"}, 2)
    layer = next(iter(quantized_layers(model).values()))
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6, 7, 2]]))
    model.train()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    expected = dequantize(layer).sum(0).expand(3, -1)
    assert torch.allclose(x.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("strategy", "quant"), [("rac_lora", "nf4"), ("fedit", "int8")])
def test_qlora_run_learns_and_exports(ckpt, tmp_path, strategy, quant):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bench.common import compose_cfg
    from fedrac.adapters.quantized import bnb_config, quantized_layers
    from fedrac.run import run_experiment

    out = tmp_path / "run"
    cfg = compose_cfg("model=hf", f"model.path={ckpt['llama']}", "dataset=files",
                      f"dataset.path={ckpt['qa']}", "dataset.prompt_column=prompt",
                      "dataset.response_column=response", "dataset.max_length=16",
                      "task=causal_lm", "partitioner=iid", "num_clients=2", "num_rounds=2",
                      "client.lr=0.02", f"strategy={strategy}", "strategy.rank=2",
                      f"model.quantization={quant}", f"output_dir={out}",
                      f"cache_dir={tmp_path / 'cache'}")
    summary = run_experiment(cfg)
    assert summary["status"] == "ok" and summary["model_changed"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"])  # it learns
    final = load_file(str(out / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "hf_model"))
    assert all(p.is_floating_point() for p in merged.parameters())  # dense, unquantised
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    own = AutoModelForCausalLM.from_pretrained(str(ckpt["llama"]))
    own.load_state_dict(final)
    assert (merged(input_ids=ids).logits - own(input_ids=ids).logits).abs().max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(
        str(ckpt["llama"]), quantization_config=bnb_config({"quantization": quant},
                                                          torch.float32), device_map="cpu")
    quantized_layers(base)  # (bitsandbytes' CPU repacking fails on layers this small)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    gap = (adapted(input_ids=ids).logits - own(input_ids=ids).logits).abs().max()
    assert gap < 0.5, gap  # the adapter on Q(W0) against the dense W0 + dW: quantisation error


BAD = [
    (["model.quantization=nf3"], "model.quantization='nf3' is not allowed; allowed: none, nf4, "
                                 "int8"),
    (["strategy=fedavg", "model.quantization=nf4"],
     "model.quantization=nf4 freezes the base weights, which strategy=fedavg trains"),
    (["model.quantization=int8", "+probe=broken"],
     "model.quantization=int8 cannot run on device=cpu with the installed bitsandbytes "
     "(no int8 kernel here); allowed here: none"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_quantization_stops_with_one_line(ckpt, args, message, tmp_path, monkeypatch,
                                              capsys):
    from fedrac import cli
    from fedrac.adapters import quantized

    if "+probe=broken" in args:  # a bitsandbytes without a kernel for this device
        args = [a for a in args if a != "+probe=broken"]

        def broken(name, device):
            raise RuntimeError(f"no {name} kernel here")

        monkeypatch.setattr(quantized, "_probe", broken)
    out = tmp_path / "run"
    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [
        "fedrac", "model=hf", f"model.path={ckpt['bert']}", "dataset=files",
        f"dataset.path={ckpt['sentiment']}", "dataset.text_column=text", *args,
        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h'}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_quantization_needs_a_transformers_model(tmp_path, monkeypatch, capsys):
    from fedrac import cli

    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fedrac", "+model.quantization=nf4",
                                      f"output_dir={tmp_path / 'run'}",
                                      f"hydra.run.dir={tmp_path / 'h'}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert "model.quantization=nf4 needs model=hf" in capsys.readouterr().err


