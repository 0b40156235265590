"""Causal language modelling: next-token cross-entropy on the loss tokens; perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedrac.tasks.base import Task, call_model


def _shifted(logits: torch.Tensor, input_ids: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of positions ``0..L-2`` and their next tokens, where ``mask[1:]`` is set."""
    keep = mask[:, 1:].bool()
    return logits[:, :-1][keep], input_ids[:, 1:][keep]


class CausalLM(Task):
    """Next-token prediction with a causal language model (``AutoModelForCausalLM``).

    The loss counts the tokens whose ``loss_mask`` is 1: the response tokens when the
    dataset names ``prompt_column`` / ``response_column``, else every real token (never
    padding). Metrics: ``eval_loss`` (mean token cross-entropy), ``eval_perplexity``
    (``exp`` of it) and ``eval_accuracy`` (next-token top-1 accuracy).
    """

    name = "causal_lm"

    def target(self, x: Any, inputs, idx: torch.Tensor) -> torch.Tensor:
        return inputs["loss_mask"] * inputs["attention_mask"]

    def loss(self, model: nn.Module, batch: tuple[Any, Any]) -> torch.Tensor:
        inputs, mask = batch
        logits, targets = _shifted(call_model(model, inputs), inputs["input_ids"], mask)
        return nn.functional.cross_entropy(logits.float(), targets)

    def loss_weight(self, batch: tuple[Any, Any]) -> torch.Tensor:
        """The batch's loss tokens (on the device: no host synchronisation)."""
        return batch[1][:, 1:].sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Any, y: Any, device: torch.device,
                 batch_size: int | None = None) -> dict[str, float]:
        model.eval()
        n = self.num_examples(x, y)
        bs = int(batch_size or x.eval_batch_size)
        nll, correct, tokens = 0.0, 0, 0
        for i in range(0, n, bs):
            inputs, mask = self.batch((x, y), torch.arange(i, min(i + bs, n)), device)
            logits, targets = _shifted(call_model(model, inputs), inputs["input_ids"], mask)
            nll += float(nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
            tokens += int(targets.numel())
        loss = nll / max(tokens, 1)
        return {"eval_loss": loss, "eval_accuracy": correct / max(tokens, 1),
                "eval_perplexity": math.exp(min(loss, 700.0))}
