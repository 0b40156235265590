"""task=causal_lm on TRL's dataset formats (``text``; ``prompt`` + ``completion``;
conversational ``messages`` through the tokenizer's chat template), its defaults and reports,
and generation-based evaluation (``task.generate_eval``)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from tests import hf_models as H

pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GPT-2 with and without a chat template, and the QA rows in TRL's formats."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("trl")
    plain = H.build_checkpoint(root / "gpt2", "gpt2")
    chat = H.build_checkpoint(root / "gpt2chat", "gpt2")
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat)
    rows = H.qa_rows(40)
    out = {"plain": plain, "chat": chat}
    out["text"] = H.write_jsonl(root / "text.jsonl", [{"text": r["text"]} for r in rows])
    out["pc"] = H.write_jsonl(root / "pc.jsonl", [
        {"prompt": r["prompt"] + " ", "completion": r["response"]} for r in rows])
    out["messages"] = H.write_jsonl(root / "messages.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]},
                      {"role": "assistant", "content": r["response"]}]} for r in rows])
    out["chat_pc"] = H.write_jsonl(root / "chat_pc.jsonl", [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
    out["prompt_only"] = H.write_jsonl(root / "prompt_only.jsonl",
                                       [{"prompt": r["prompt"]} for r in rows])
    return out


def _tokenised(files, table: str, tokenizer: str = "chat"):
    from datasets import load_dataset

    from fedrac.data.text import text_columns, tokenize

    data = load_dataset("json", data_files=str(files[table]), split="train")
    cfg = {"text_column": "auto", "tokenizer": str(files[tokenizer]), "max_length": 32,
           "cache_dir": str(files["chat"].parent / "cache")}
    cols = text_columns(cfg, "causal_lm", data.column_names, "t")
    return cols, tokenize(data, cfg, "causal_lm", cols)


def _decoded(files, row) -> tuple[list[str], list[str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["chat"])
    ids, mask = row["input_ids"], row["loss_mask"]
    return (tok.convert_ids_to_tokens([i for i, m in zip(ids, mask, strict=True) if m]),
            tok.convert_ids_to_tokens(ids))


def test_formats_are_recognised_by_their_columns():
    from fedrac.data.text import trl_columns

    assert trl_columns(["messages", "id"], "t") == {"messages": "messages"}
    assert trl_columns(["prompt", "completion"], "t") == {"prompt": "prompt",
                                                          "response": "completion"}
    assert trl_columns(["text", "meta"], "t") == {"text": "text"}


@pytest.mark.parametrize(("have", "message"), [
    (["prompt", "answer"], r"has \['prompt'\] but no \['completion'\] column \(TRL's "
                           r"prompt-completion format"),
    (["completion"], r"has \['completion'\] but no \['prompt'\]"),
    (["question", "answer"], r"has none of TRL's columns \(its columns: question, answer\)"),
])
def test_incomplete_formats_name_the_missing_column(have, message):
    from fedrac.data.sources import DataConfigError
    from fedrac.data.text import trl_columns

    with pytest.raises(DataConfigError, match=r"^dataset.text_column=auto: t " + message):
        trl_columns(have, "t")


def test_prompt_completion_trains_on_the_completion_only(files):
    cols, ds = _tokenised(files, "pc")
    assert cols == {"prompt": "prompt", "response": "completion"}
    loss, every = _decoded(files, ds[0])
    assert loss in (["blue", "</s>"], ["green", "</s>"])
    assert every[:2] == ["question", "what"] and every[-2:] == loss


def test_messages_train_on_the_assistant_turns_through_the_chat_template(files):
    cols, ds = _tokenised(files, "messages")
    assert cols == {"messages": "messages"}
    loss, every = _decoded(files, ds[0])
    assert loss in (["blue", "</s>"], ["green", "</s>"])  # not the user turn, not the header
    assert every[0] == "<unk>" and "question" in every  # 'user' rendered by the template
    assert every.index(loss[0]) > every.index("answer")


def test_conversational_prompt_completion_trains_on_the_completions_turns(files):
    cols, ds = _tokenised(files, "chat_pc")
    assert cols == {"prompt": "prompt", "response": "completion"}
    loss, every = _decoded(files, ds[0])
    assert loss in (["blue", "</s>"], ["green", "</s>"])
    assert every.index(loss[0]) > every.index("answer")


def test_text_trains_on_every_token(files):
    cols, ds = _tokenised(files, "text")
    assert cols == {"text": "text"}
    assert all(ds[0]["loss_mask"])


def test_messages_without_a_chat_template_stop_with_one_line(files):
    from fedrac.data.sources import DataConfigError

    with pytest.raises(DataConfigError, match=r"^dataset.messages_column='messages' holds "
                       r"conversations .* has no chat template; allowed: a tokenizer with a "
                       r"chat_template"):
        _tokenised(files, "messages", tokenizer="plain")


def test_answer_spans_and_token_f1():
    from fedrac.data.text import TokenData
    from fedrac.tasks.generation import answer_spans, token_f1

    x = TokenData(input_ids=[torch.tensor([5, 6, 7, 8, 2]), torch.tensor([5, 6, 2])],
                  labels=None, pad_id=0,
                  loss_mask=[torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 1, 1])])
    assert answer_spans(x, 5, eos_id=2) == [([5, 6], [7, 8])]  # the text row has no prompt
    assert token_f1([7, 8], [7, 8]) == 1.0
    assert token_f1([7, 9], [7, 8]) == pytest.approx(0.5)
    assert token_f1([9], [7, 8]) == 0.0


def _cfg(files, *extra: str):
    from bench.common import compose_cfg

    return compose_cfg("model=hf", f"model.path={files['chat']}", "dataset=files",
                       "task=causal_lm", "dataset.max_length=24", "num_clients=2",
                       "num_rounds=2", "client.lr=0.01", *extra)


def test_causal_lm_defaults_to_trl_columns_and_iid(files, tmp_path):
    cfg = _cfg(files, f"dataset.path={files['pc']}", f"output_dir={tmp_path}")
    assert cfg["dataset"]["text_column"] == "auto"
    assert cfg["partitioner"]["name"] == "iid"


@pytest.mark.parametrize(("extra", "message"), [
    (["task=classification", "+task.generate_eval=3", "dataset.text_column=text"],
     "task.generate_eval=3 is not allowed; allowed: 0 with task=classification"),
    (["task.generate_eval=-1"], "task.generate_eval=-1 is not allowed; allowed: an integer"),
])
def test_bad_generate_eval_stops_with_one_line(files, tmp_path, extra, message):
    from fedrac.settings.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _cfg(files, f"dataset.path={files['pc']}", f"output_dir={tmp_path}", *extra)


def test_generate_eval_on_a_text_table_stops_before_training(files, tmp_path):
    from fedrac.run import run_experiment
    from fedrac.settings.config import ConfigError

    cfg = _cfg(files, f"dataset.path={files['text']}", "task.generate_eval=4",
               f"output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"^task.generate_eval=4 needs prompts to answer"):
        run_experiment(cfg)
    assert not (tmp_path / "metrics.csv").exists()  # stopped before the first round's file


def test_messages_run_reports_tokens_perplexity_and_generation_scores(files, tmp_path, capsys):
    from fedrac.run import run_experiment

    random.seed(0)
    cfg = _cfg(files, f"dataset.path={files['messages']}", "task.generate_eval=4",
               "task.generate_max_new_tokens=3", f"output_dir={tmp_path}")
    from fedrac.server.results import format_table

    table = format_table([run_experiment(cfg)])
    out = capsys.readouterr().out
    assert "causal LM: " in out and " tokens (" in out and "loss on " in out
    assert "classes" not in out.split("fedrac:")[0]
    assert " em " in out and " f1 " in out  # the progress lines
    assert "| final ppl | final loss | next-token acc | exact match | F1 |" in table
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    em = [float(r["eval_exact_match"]) for r in rows]
    f1 = [float(r["eval_f1"]) for r in rows]
    assert len(em) == 3 and all(0.0 <= v <= 1.0 for v in em + f1)
    assert all(f >= e for e, f in zip(em, f1, strict=True))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_eval_f1"] == pytest.approx(f1[-1])


def test_final_table_of_a_summary_read_back_from_json():
    """summary.json writes NaN as null: the table still prints (perplexity, no F1 columns)."""
    from fedrac.server.results import format_table

    summary = {"label": "rac_lora r=2", "config": {"task": "causal_lm"},
               "final_eval_perplexity": 12.5, "final_eval_loss": 2.5257, "final_accuracy": 0.25,
               "final_eval_f1": None, "final_eval_exact_match": None,
               "bytes_up_per_round": 2048, "bytes_down_per_round": 4096,
               "seconds_per_round": 0.5, "client_seconds_per_round": 0.25}
    table = format_table([summary])
    assert "| rac_lora r=2 | 12.500 | 2.5257 | 0.2500 | 2.0 KiB | 4.0 KiB |" in table
    assert "F1" not in table
