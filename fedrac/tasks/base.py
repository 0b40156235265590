"""What a task is: loss, metrics, batching and evaluation for one kind of model output.

A task turns a client's data (dense ``x`` and labels ``y``, or tokenised text as
:class:`fedrac.data.text.TokenData`) into batches, computes the training loss on a
batch and evaluates a model on held-out data. The training loop
(:func:`fedrac.training.local.train_locally`), pretraining and the server's
evaluation all go through it, so none of them knows what the model predicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or a transformers output's ``logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a dict batch; the logits."""
    if isinstance(inputs, Mapping):
        return logits_of(model(**inputs))
    return logits_of(model(inputs))


class Task:
    """Base of the tasks; subclasses define ``loss`` and ``evaluate``.

    ``prepare`` moves a client's data where batches are cut from (dense tensors go to the
    device once; token lists stay on the CPU and are padded per batch); ``batch`` cuts
    the rows ``idx`` as ``(inputs, target)``.
    """

    name = "base"
    eval_batch_size = 1024

    def num_examples(self, x: Any, y: Any) -> int:
        """How many examples the data holds."""
        return len(x)

    def prepare(self, x: Any, y: Any, device: torch.device) -> tuple[Any, Any]:
        """The data as batches are cut from it."""
        if isinstance(x, torch.Tensor):
            return x.to(device), (y.to(device) if y is not None else None)
        return x, y

    def batch(self, data: tuple[Any, Any], idx: torch.Tensor,
              device: torch.device) -> tuple[Any, Any]:
        """Rows ``idx`` of the prepared data as ``(inputs, target)`` on ``device``."""
        x, y = data
        if isinstance(x, torch.Tensor):
            idx = idx.to(device)
            return x[idx], y[idx]
        inputs = x.collate(idx)
        target = self.target(x, inputs, idx)
        return ({k: v.to(device) for k, v in inputs.items() if k != "loss_mask"},
                target.to(device))

    def target(self, x: Any, inputs: Mapping[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """What the loss compares the output of a token batch with."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[Any, Any]) -> torch.Tensor:
        """The mean training loss of ``model`` on one batch."""
        raise NotImplementedError

    def loss_weight(self, batch: tuple[Any, Any]) -> Any:
        """How many terms :meth:`loss` averages over on ``batch`` (its examples): a
        micro-batch's weight in an accumulated step (an int or a tensor on the device)."""
        return len(batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Any, y: Any, device: torch.device,
                 batch_size: int | None = None) -> dict[str, float]:
        """``eval_loss``, ``eval_accuracy`` and the task's own metrics on ``(x, y)``."""
        raise NotImplementedError
