"""model=hf and text data: PEFT's default targets, GPT-2 Conv1D exactness, tokenisation and
padding, string labels, one base model for many clients, and the one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch

from fedrac.adapters import (
    attach_adapters,
    effective_weights,
    find_target_layers,
    merge_adapters,
    remove_adapters,
)
from tests import hf_models as H

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny random BERT, GPT-2 and LLaMA checkpoints, and text tables."""
    root = tmp_path_factory.mktemp("hf")
    out = {a: H.build_checkpoint(root / a, a) for a in H.ARCHS}
    out["sentiment"] = H.write_csv(root / "sentiment.csv", H.sentiment_rows(160))
    out["qa"] = H.write_jsonl(root / "qa.jsonl", H.qa_rows(60))
    return out


def _hf(ckpt, arch, task="classification", num_labels=2):
    from fedrac.models.hf import build_hf_model

    return build_hf_model({"name": "hf", "path": str(ckpt[arch]), "task": task,
                           "trainable_modules": "auto"}, num_labels)


@pytest.mark.parametrize(("arch", "task", "expected"), [
    ("bert", "classification", {"query", "value"}),
    ("gpt2", "causal_lm", {"c_attn"}),
    ("llama", "causal_lm", {"q_proj", "v_proj"}),
])
def test_target_modules_auto_is_pefts_default_per_architecture(ckpt, arch, task, expected):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model = _hf(ckpt, arch, task)
    layers = find_target_layers(model, "auto")
    assert {n.rsplit(".", 1)[1] for n in layers} == expected
    assert set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[arch]) == expected
    assert len(layers) == 2 * len(expected)  # two blocks
    assert all(spec.transposed == (arch == "gpt2") for spec in layers.values())


def test_gpt2_conv1d_lora_is_exact_and_matches_peft(ckpt):
    """Conv1D stores W as d_in x d_out: the adapted layer computes x (W + (s B A)^T) + b,
    the same as PEFT's LoRA on it (fan_in_fan_out), and merging keeps the outputs."""
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(0)
    model = _hf(ckpt, "gpt2", "causal_lm").eval()
    layers = find_target_layers(model, ["c_attn"])
    name = "transformer.h.0.attn.c_attn"
    spec = layers[name]
    conv = model.get_submodule(name)
    assert (spec.d_in, spec.d_out) == (conv.nx, conv.nf) == (32, 96)
    rank, alpha = 3, 6.0
    factors = {n: (torch.randn(rank, s.d_in, generator=gen), torch.randn(s.d_out, rank,
                                                                          generator=gen))
               for n, s in layers.items()}
    x = torch.randn(2, 5, 32, generator=gen)
    w0, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    a, b = factors[name]
    expected = x @ (w0 + (alpha / rank) * (b @ a).T) + bias
    ids = torch.randint(0, 30, (2, 7), generator=gen)
    attach_adapters(model, layers, factors, rank, alpha, {n: "A" for n in layers})
    assert torch.allclose(conv(x), expected, atol=1e-5)
    adapted = model(input_ids=ids).logits.detach()
    remove_adapters(model)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                                  target_modules=["c_attn"],
                                                  fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():
        for n, (fa, fb) in factors.items():
            lora = peft_model.base_model.model.get_submodule(n)
            lora.lora_A["default"].weight.copy_(fa)
            lora.lora_B["default"].weight.copy_(fb)
    # PEFT computes x A^T B^T beside x W: the same numbers, summed in another order
    assert (peft_model.eval()(input_ids=ids).logits - adapted).abs().max() < 1e-4
    model = peft_model.unload()
    attach_adapters(model, layers, factors, rank, alpha, {n: "B" for n in layers})
    merge_adapters(model)
    # merged: x (W + ΔW) against x W + (x Aᵀ) Bᵀ s, the same sum in another order
    assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-4)


def test_server_merge_of_a_conv1d_layer_is_the_clients_adapted_weight(ckpt):
    """The merge the server runs (delta_sync.merge_factors) lays ΔW out transposed too."""
    from fedrac.wire.delta_sync import merge_factors

    model = _hf(ckpt, "gpt2", "causal_lm")
    layers = find_target_layers(model, "auto")
    gen = torch.Generator().manual_seed(1)
    factors = {f"{n}.lora_{s}": torch.randn(*spec.factor_shape(s, 2), generator=gen)
               for n, spec in layers.items() for s in "AB"}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = merge_factors(state, layers, factors, {}, 0.5)
    attach_adapters(model, layers, {n: (factors[f"{n}.lora_A"], factors[f"{n}.lora_B"])
                                    for n in layers}, 2, 1.0, {n: "A" for n in layers})
    adapted = effective_weights(model)
    for spec in layers.values():
        assert torch.allclose(adapted[spec.weight_key], merged[spec.weight_key], atol=1e-6)


def test_text_is_tokenised_once_cached_and_padded_per_batch(ckpt, tmp_path):
    from fedrac.data import load_splits, to_tensors
    from fedrac.data.text import TokenData
    from fedrac.tasks import get_task

    cfg = {"name": "files", "path": str(ckpt["sentiment"]), "text_column": "text",
           "label_column": "label", "max_length": 6, "tokenizer": str(ckpt["bert"]),
           "cache_dir": str(tmp_path), "test_fraction": 0.25, "split_seed": 0}
    splits = load_splits(cfg)
    assert splits.label_names == ["neg", "pos"] and splits.num_classes == 2
    assert len(splits.target_train) == 120 and len(splits.target_test) == 40
    cached = list((tmp_path / "tokenized").glob("*.arrow"))
    assert len(cached) == 1
    x, y = to_tensors(splits.target_train)
    assert isinstance(x, TokenData) and len(x) == 120 and y.dtype == torch.long
    assert max(len(r) for r in x.input_ids) == 6  # [CLS] 5 words [SEP] truncated to 6
    batch, labels = get_task("classification").batch((x, y), torch.tensor([0, 3]), "cpu")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape[0] == 2 and torch.equal(labels, y[[0, 3]])
    short = TokenData([torch.tensor([2, 5, 3]), torch.tensor([2, 3])], None, pad_id=0)
    padded = short.collate(torch.tensor([0, 1]))
    assert padded["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    from fedrac.data.load import build_splits

    again = build_splits(cfg)  # a new process would read the cached tokens
    assert again.target_train["input_ids"] == splits.target_train["input_ids"]
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 1


def test_causal_lm_loss_counts_only_the_response_tokens(ckpt, tmp_path):
    from fedrac.data import load_splits, to_tensors
    from fedrac.tasks import get_task

    cfg = {"name": "files", "path": str(ckpt["qa"]), "prompt_column": "prompt",
           "response_column": "response", "max_length": 32, "task": "causal_lm",
           "tokenizer": str(ckpt["gpt2"]), "cache_dir": str(tmp_path), "test_fraction": 0.25}
    x, _ = to_tensors(load_splits(cfg).target_train)
    # prompt "question what colour is the sky answer" (7), response "blue" + EOS
    assert all(m.tolist() == [0] * 7 + [1, 1] for m in x.loss_mask)
    task = get_task("causal_lm")
    inputs, mask = task.batch((x, None), torch.arange(4), "cpu")
    assert int(mask.sum()) == 8
    model = _hf(ckpt, "gpt2", "causal_lm").eval()
    logits = model(**inputs).logits
    picked = torch.nn.functional.cross_entropy(logits[:, 7:8].reshape(-1, logits.shape[-1]),
                                               inputs["input_ids"][:, 8:9].reshape(-1))
    both = torch.nn.functional.cross_entropy(
        logits[:, 6:8].reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 7:9].reshape(-1))
    loss = task.loss(model, (inputs, mask))
    assert torch.allclose(loss, both) and not torch.allclose(loss, picked)
    metrics = task.evaluate(model, x, None, torch.device("cpu"))
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(
        metrics["eval_loss"]).exp().item())


def test_string_labels_of_numeric_tables_are_mapped_and_named(tmp_path):
    from fedrac.data import load_splits

    rows = [{"f1": float(i % 7), "f2": float(i % 3), "kind": ["cat", "ant", "bee"][i % 3]}
            for i in range(90)]
    path = H.write_csv(tmp_path / "t.csv", rows)
    splits = load_splits({"name": "files", "path": str(path), "label_column": "kind",
                          "test_fraction": 0.2})
    assert splits.label_names == ["ant", "bee", "cat"] and splits.num_classes == 3
    labels = splits.target_train["label"]
    feats = splits.target_train["x"]
    assert all(["cat", "ant", "bee"][int(round(f[1]))] == splits.label_names[lab]
               for f, lab in zip(feats, labels, strict=True))


def test_one_base_model_per_process_however_many_clients(ckpt, tmp_path, monkeypatch):
    """The inline engine builds the transformer the same number of times for 2 and for 12
    clients (the clients share this process's instance, and so does the server)."""
    import fedrac.models.hf as hf
    from clients import handlers
    from fedrac.models import pretrain
    from fedrac.run import run_experiment
    from tests.test_hf_e2e import compose

    built = []
    real = hf.build_hf_model
    monkeypatch.setattr(hf, "build_hf_model", lambda *a, **k: built.append(1) or real(*a, **k))
    counts = []
    for n in (2, 12):
        cfg = compose(ckpt, tmp_path / f"c{n}", "classification", "strategy=rac_lora",
                      f"num_clients={n}", "num_rounds=1", "partitioner=iid")
        handlers._model.cache_clear()
        pretrain._checkpoint_record.cache_clear()
        built.clear()
        run_experiment(cfg)
        counts.append(len(built))
    assert counts[0] == counts[1] <= 2, counts


BAD = [
    (["model.path={tmp}"], "model.path='{tmp}' is not a transformers checkpoint; allowed: a "
                           "folder with config.json"),
    (["model.tokenizer={tmp}"], "model.tokenizer='{tmp}' holds no tokenizer"),
    (["dataset.text_column=words"], "dataset.text_column='words' is not a column of"),
    (["dataset.max_length=0"], "dataset.max_length=0 is not allowed; allowed: an integer > 0"),
    (["model.target_modules=[attn]"], "model.target_modules=['attn'] matches no Linear/Conv "
                                      "layer; allowed: names or globs over ['classifier', "
                                      "'dense', 'key', 'query', 'value']"),
    (["task=causal_lm", "partitioner=iid", "model.path=null",
      "model.config={{model_type:distilbert,vocab_size:40,dim:16,n_layers:1,n_heads:2,"
      "hidden_dim:32}}", "model.tokenizer={bert}"],
     "task=causal_lm cannot be served by"),
    (["model=mlp"], "model='mlp' is not allowed; allowed: hf (text needs a transformers model"),
    (["model.trainable_modules=[pooler_xyz]"], "model.trainable_modules=['pooler_xyz'] matches "
                                               "no module"),
    (["client.warmup_steps=-1"], "client.warmup_steps=-1 is not allowed; allowed: an integer"),
    (["client.max_grad_norm=0"], "client.max_grad_norm=0 is not allowed"),
    (["model.dtype=float64"], "model.dtype='float64' is not allowed; allowed: float32, bfloat16"),
    (["model.export_rank=33"], "model.export_rank=33 is not allowed; allowed: auto or 1..32"),
    (["strategy=fedavg", "model.dtype=bfloat16"], "model.dtype='bfloat16' is not allowed; "
                                                  "allowed: float32 with strategy=fedavg"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_hf_input_stops_with_one_line(ckpt, args, message, tmp_path, monkeypatch, capsys):
    from fedrac import cli

    empty = tmp_path / "empty"
    empty.mkdir()
    fill = {"tmp": str(empty), "bert": str(ckpt["bert"])}
    out = tmp_path / "run"
    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    base = ["model=hf", f"model.path={ckpt['bert']}", "dataset=files",
            f"dataset.path={ckpt['sentiment']}", "dataset.text_column=text"]
    if "model=mlp" in args:
        base = base[2:]
    monkeypatch.setattr(sys, "argv", ["fedrac", *base, *(a.format(**fill) for a in args),
                                      f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h'}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedrac: error: ") and message.format(**fill) in err[0], err[0]
    assert not out.exists()


def test_causal_lm_text_takes_size_skew_and_natural_partitions(ckpt, tmp_path):
    from fedrac.data import partition

    rows = [{**r, "writer": f"w{i % 3}"} for i, r in enumerate(H.qa_rows(60))]
    path = H.write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = {"name": "files", "path": str(path), "text_column": "text", "task": "causal_lm",
           "max_length": 16, "tokenizer": str(ckpt["gpt2"]), "cache_dir": str(tmp_path),
           "test_fraction": 0.25, "group_column": "writer"}
    sizes = [len(partition(cfg, {"name": "size_skew", "sizes": "linear"}, 3, i, 0))
             for i in range(3)]
    assert sizes[0] < sizes[1] < sizes[2] and sum(sizes) == 45
    natural = [partition(cfg, {"name": "natural", "partition_by": "writer"}, 3, i, 0)
               for i in range(3)]
    assert sorted(set(p["writer"]) == {p["writer"][0]} for p in natural) == [True] * 3
    assert all("input_ids" in p.column_names and "loss_mask" in p.column_names for p in natural)


def test_bfloat16_base_with_gradient_checkpointing_trains_float32_adapters(ckpt):
    """model.dtype=bfloat16: the frozen base is bfloat16, the factors, the head and the
    optimizer state float32; activation checkpointing does not change the gradients."""
    from clients.handlers import module_keys
    from fedrac.adapters import adapter_factors
    from fedrac.data import load_splits, to_tensors
    from fedrac.models.hf import build_hf_model
    from fedrac.settings.typed import ModelSettings
    from fedrac.tasks import get_task
    from fedrac.training.local import TrainSettings, train_locally

    data = {"name": "files", "path": str(ckpt["sentiment"]), "text_column": "text",
            "max_length": 8, "tokenizer": str(ckpt["bert"]), "test_fraction": 0.25}
    x, y = to_tensors(load_splits(data).target_train)
    grads = {}
    for dtype, checkpointing in (("bfloat16", False), ("bfloat16", True), ("float32", False)):
        cfg = {"model": {"name": "hf", "path": str(ckpt["bert"]), "task": "classification",
                         "dtype": dtype, "gradient_checkpointing": checkpointing,
                         "trainable_modules": "auto"}}
        model = build_hf_model(cfg["model"], 2)
        layers = find_target_layers(model, "auto")
        query = model.get_submodule("bert.encoder.layer.0.attention.self.query")
        assert query.weight.dtype == getattr(torch, dtype)
        assert model.classifier.weight.dtype == torch.float32
        factors = {n: (torch.full((2, s.d_in), 0.1), torch.zeros(s.d_out, 2))
                   for n, s in layers.items()}
        attach_adapters(model, layers, factors, 2, 2.0, {n: "B" for n in layers})
        typed = ModelSettings(name="hf", target_modules=["auto"], options=cfg["model"],
                              pretrain={})
        for p in module_keys(model, typed).values():
            p.requires_grad_(True)
        train_locally(model, x, y, TrainSettings(lr=1e-2, local_steps=2, batch_size=8), 0,
                      torch.device("cpu"), get_task("classification"))
        out = adapter_factors(model)
        assert all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in out.values())
        grads[(dtype, checkpointing)] = out
    same = grads[("bfloat16", False)]
    assert all(torch.equal(same[k], grads[("bfloat16", True)][k]) for k in same)
    full = grads[("float32", False)]  # bfloat16 rounding moves AdamW's steps, not their course
    a, b = (torch.cat([g[k].flatten() for k in sorted(g)]) for g in (same, full))
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9
