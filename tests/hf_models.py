"""Tiny transformers checkpoints for tests: random BERT, GPT-2 and LLaMA written with
``save_pretrained``, each with a word-level tokenizer built here (``tokenizers``), and small
text tables. Nothing touches the network."""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "happy", "bright", "warm", "kind", "calm"]
NEGATIVE = ["bad", "poor", "sad", "dark", "cold", "cruel", "angry", "dull"]
NEUTRAL = ["the", "a", "day", "film", "food", "room", "was", "is", "very", "quite", "and",
           "question", "answer", "what", "colour", "sky", "blue", "grass", "green"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL
ARCHS = ("bert", "gpt2", "llama")


def build_tokenizer(folder: Path, arch: str):
    """A word-level fast tokenizer over ``WORDS``, saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if arch == "bert" else \
        ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    unk = specials[1] if arch == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                       pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                       mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids",
                                                          "attention_mask"])
    else:
        if arch == "llama":
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return fast, vocab


def model_config(arch: str, vocab: dict[str, int]) -> dict:
    """A tiny random config of ``arch`` (as ``model.config`` takes it)."""
    n = len(vocab)
    if arch == "bert":
        return {"model_type": "bert", "vocab_size": n, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 64, "pad_token_id": vocab["[PAD]"]}
    if arch == "gpt2":
        return {"model_type": "gpt2", "vocab_size": n, "n_embd": 32, "n_layer": 2, "n_head": 2,
                "n_positions": 64, "bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"]}
    return {"model_type": "llama", "vocab_size": n, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "bos_token_id": vocab["<s>"],
            "eos_token_id": vocab["</s>"]}


def build_checkpoint(folder: Path, arch: str, seed: int = 0) -> Path:
    """A random ``arch`` checkpoint and its tokenizer, saved into ``folder``.

    BERT is saved as the bare encoder (like all-MiniLM-L6-v2), after 40 steps of full
    training on sentiment rows with a throw-away head, so that its features carry the
    sentiment as a pretrained model's would (a random tiny encoder's barely depend on the
    input). GPT-2 and LLaMA are random causal LMs.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tok, vocab = build_tokenizer(folder, arch)
    cfg = dict(model_config(arch, vocab))
    torch.manual_seed(seed)
    if arch != "bert":
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
        return folder
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    rows = sentiment_rows(320, seed=seed + 100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = rows[(step * 16) % 320:(step * 16) % 320 + 16]
        enc = tok([r["text"] for r in batch], return_tensors="pt", padding=True)
        labels = torch.tensor([int(r["label"] == "pos") for r in batch])
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    model.bert.save_pretrained(str(folder))
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows ``{text, label}``: a sentence of neutral words and one sentiment word; string
    labels ``pos`` / ``neg``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(NEUTRAL, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows ``{prompt, response, text}`` of a trivially learnable question/answer pattern."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, colour = rng.choice([("sky", "blue"), ("grass", "green")])
        prompt = f"question what colour is the {thing} answer"
        rows.append({"prompt": prompt, "response": colour, "text": f"{prompt} {colour}"})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a CSV table."""
    import csv

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
