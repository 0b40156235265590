"""The local training loop and evaluation, shared by clients, pretraining and the server."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings; ``local_steps`` (when set) overrides ``local_epochs``."""

    optimizer: str = "adamw"
    lr: float = 0.01
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 16
    weight_decay: float = 0.0
    momentum: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    """Mean training loss, number of examples and compute seconds of one local run."""

    loss: float
    num_examples: int
    steps: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) as a ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but no CUDA device is available; "
                           "allowed: cpu, auto")
    return torch.device(device)


def move_to(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)``, skipped when its first parameter is already there."""
    first = next(model.parameters(), None)
    if first is None or first.device != device:
        model.to(device)


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer named by ``settings.optimizer`` over ``params``."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"client.optimizer={settings.optimizer!r} is not allowed; "
                     f"allowed: {', '.join(OPTIMIZERS)}")


def _batches(n: int, settings: TrainSettings, gen: torch.Generator):
    """Index batches: ``local_steps`` batches, or ``local_epochs`` passes over ``n`` items."""
    bs = max(1, min(int(settings.batch_size), n))
    if settings.local_steps:
        done = 0
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                yield perm[i:i + bs]
                done += 1
                if done == settings.local_steps:
                    return
    for _ in range(int(settings.local_epochs)):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            yield perm[i:i + bs]


def train_locally(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings,
    seed: int, device: torch.device,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``(x, y)`` with cross-entropy."""
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    gen = torch.Generator().manual_seed(int(seed))
    x, y = x.to(device), y.to(device)
    model.train()
    total, count, steps = 0.0, 0, 0
    loss_fn = nn.CrossEntropyLoss()
    for idx in _batches(len(y), settings, gen):
        idx = idx.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(total / max(count, 1), int(len(y)), steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(dim=1) == yb).sum())
    n = max(len(y), 1)
    return loss_sum / n, correct / n
