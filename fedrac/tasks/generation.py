"""Generation-based evaluation of a causal LM (``task.generate_eval``): greedy answers to
held-out prompts, scored by exact match and token-overlap F1 against the reference answers.

A held-out row's prompt is every token before its last run of loss tokens (the completion,
or the last assistant turn, as rendered for training); the reference is that run without its
final EOS. Answers are compared as token ids of the run's own tokenizer (SQuAD's F1 on tokens).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from fedrac.settings.typed import DataSettings


def answer_spans(x: Any, limit: int, eos_id: int | None) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, reference ids)`` of the first ``limit`` rows of tokenised data ``x`` that
    have a prompt before their last run of loss tokens."""
    out: list[tuple[list[int], list[int]]] = []
    if x.loss_mask is None:
        return out
    for ids, mask in zip(x.input_ids, x.loss_mask, strict=True):
        ids, mask = ids.tolist(), mask.tolist()
        end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
        if end == 0:
            continue
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        if start == 0:
            continue  # a text row: loss everywhere, no prompt to answer
        ref = ids[start:end]
        if eos_id is not None and ref and ref[-1] == eos_id:
            ref = ref[:-1]
        out.append((ids[:start], ref))
        if len(out) >= limit:
            break
    return out


def token_f1(pred: list[int], ref: list[int]) -> float:
    """Token-overlap F1 (SQuAD's): ``2PR / (P + R)`` over the multiset of shared tokens."""
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


@torch.no_grad()
def generation_metrics(model: nn.Module, spans: list[tuple[list[int], list[int]]],
                       max_new_tokens: int, eos_id: int | None, pad_id: int,
                       device: torch.device) -> dict[str, float]:
    """``eval_exact_match`` and ``eval_f1`` of greedy answers to ``spans``' prompts."""
    model.eval()
    exact = f1 = 0.0
    for prompt, ref in spans:
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=int(max_new_tokens),
                             do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id,
                             use_cache=True)
        answer = out[0, len(prompt):].tolist()
        if eos_id is not None and eos_id in answer:
            answer = answer[:answer.index(eos_id)]
        exact += float(answer == ref)
        f1 += token_f1(answer, ref)
    n = max(len(spans), 1)
    return {"eval_exact_match": exact / n, "eval_f1": f1 / n}


def generation_setup(data: DataSettings, x: Any) -> dict[str, Any] | None:
    """What :func:`generation_metrics` needs for a run (``task.generate_eval`` > 0), else
    None; a held-out split without prompts stops the run with one line."""
    task = data.task
    n = int(task.get("generate_eval") or 0)
    if n <= 0 or task.get("name") != "causal_lm":
        return None
    from fedrac.models.hf import load_tokenizer
    from fedrac.settings.errors import ConfigError

    tok = load_tokenizer(str(data.dataset["tokenizer"]))
    spans = answer_spans(x, n, tok.eos_token_id)
    if not spans:
        raise ConfigError(f"task.generate_eval={n} needs prompts to answer, and the held-out "
                          "rows have none (a 'text' table trains on every token); allowed: 0, "
                          "or a table with 'prompt' and 'completion', or 'messages'")
    return {"spans": spans, "max_new_tokens": int(task.get("generate_max_new_tokens") or 32),
            "eos_id": tok.eos_token_id, "pad_id": int(tok.pad_token_id)}
