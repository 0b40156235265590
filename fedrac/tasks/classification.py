"""Classification: cross-entropy on class logits; accuracy. Images, tables and text."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedrac.tasks.base import Task, call_model


class Classification(Task):
    """One label per example; the model outputs ``(batch, classes)`` logits.

    Dense data: ``model(x)``. Text (``TokenData``): a dict batch ``input_ids``,
    ``attention_mask`` (and ``token_type_ids``), padded per batch, for a sequence
    classification model. Metrics: ``eval_loss`` (mean cross-entropy) and ``eval_accuracy``.
    """

    name = "classification"

    def target(self, x: Any, inputs, idx: torch.Tensor) -> torch.Tensor:
        return x.labels[idx]

    def loss(self, model: nn.Module, batch: tuple[Any, Any]) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(call_model(model, inputs), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Any, y: Any, device: torch.device,
                 batch_size: int | None = None) -> dict[str, float]:
        model.eval()
        n = self.num_examples(x, y)
        loss_sum, correct = 0.0, 0
        if isinstance(x, torch.Tensor):
            bs = int(batch_size or self.eval_batch_size)
            for i in range(0, n, bs):
                xb, yb = x[i:i + bs].to(device), y[i:i + bs].to(device)
                out = model(xb)
                out = out if isinstance(out, torch.Tensor) else out.logits
                loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(dim=1) == yb).sum())
        else:
            bs = int(batch_size or x.eval_batch_size)
            for i in range(0, n, bs):
                inputs, yb = self.batch((x, y), torch.arange(i, min(i + bs, n)), device)
                out = call_model(model, inputs)
                loss_sum += float(nn.functional.cross_entropy(out.float(), yb, reduction="sum"))
                correct += int((out.argmax(dim=1) == yb).sum())
        n = max(n, 1)
        return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}
