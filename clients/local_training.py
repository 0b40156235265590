"""The local training loop and evaluation, shared by clients, pretraining and the server."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedrac.sketch import derive_seed
from fedrac.tasks import CLASSIFICATION, Task

OPTIMIZERS = ("sgd", "adamw")
WEIGHT_DECAY_MODES = ("auto", "coupled", "decoupled")
DROPOUT_STREAM = 9  # derive_seed(client-round seed, DROPOUT_STREAM) seeds torch's RNG (dropout)


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings; ``local_steps`` (when set) overrides ``local_epochs``.

    ``warmup_steps``: linear learning-rate warm-up over the first local steps of each
    round; ``max_grad_norm``: clip the gradient's global norm (``None``: no clipping).
    ``weight_decay_mode``: ``coupled`` adds ``weight_decay * p`` to the gradient (an L2 penalty
    in the loss: SGD's ``weight_decay``, Adam with L2); ``decoupled`` shrinks the parameters by
    ``1 - lr * weight_decay`` beside the step (AdamW, SGDW); ``auto`` is the optimizer's own
    (sgd: coupled, adamw: decoupled). See :func:`make_optimizer`.
    """

    optimizer: str = "adamw"
    lr: float = 0.01
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 16
    weight_decay: float = 0.0
    weight_decay_mode: str = "auto"
    momentum: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = None


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


class SGDW(torch.optim.SGD):
    """SGD with decoupled weight decay (Loshchilov & Hutter): ``p <- (1 - lr * wd) p`` before
    each (momentum) step, the decay kept out of the momentum buffer."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
                 ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = float(weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        """Decay the parameters that have a gradient, then take SGD's step."""
        for group in self.param_groups:
            decay = group["lr"] * group["decoupled_weight_decay"]
            if decay:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - decay)
        return super().step(closure)


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer named by ``settings.optimizer`` over ``params``, with its weight decay
    coupled or decoupled as ``settings.weight_decay_mode`` says.

    Kim, Kim & Ryu (arXiv 2502.09376): coupled decay ``lambda`` on LoRA factors with
    ``W = W0 + s B A`` is the penalty ``lambda/2 (||A||^2 + ||B||^2)``, whose minimum over the
    factorisations of ``X = s B A`` is the nuclear norm ``(lambda / s) ||X||_*``; decoupled
    decay (AdamW) minimises no such penalty.
    """
    mode, wd = settings.weight_decay_mode, float(settings.weight_decay)
    if mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"client.weight_decay_mode={mode!r} is not allowed; "
                         f"allowed: {', '.join(WEIGHT_DECAY_MODES)}")
    if settings.optimizer == "sgd":
        if mode == "decoupled":
            return SGDW(params, lr=settings.lr, momentum=settings.momentum, weight_decay=wd)
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=wd)
    if settings.optimizer == "adamw":
        if mode == "coupled":  # L2 in the gradient, then Adam's scaling (torch's Adam)
            return torch.optim.Adam(params, lr=settings.lr, weight_decay=wd)
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=wd)
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


def _lr_at(settings: TrainSettings, step: int) -> float:
    """The learning rate of local step ``step`` (0-based): linear warm-up, then constant."""
    lr = float(settings.lr)
    if settings.warmup_steps and step < settings.warmup_steps:
        return lr * (step + 1) / (settings.warmup_steps + 1)
    return lr


def train_locally(
    model: nn.Module, x: Any, y: torch.Tensor | None, settings: TrainSettings,
    seed: int, device: torch.device, task: Task | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``(x, y)`` with ``task``'s loss.

    ``x`` is a dense tensor or tokenised text (:class:`fedrac.data.text.TokenData`); the
    task (default: classification) cuts and pads the batches. Batch order comes from
    ``seed``; torch's own RNG (dropout) is seeded from it too, inside this call only, so a
    client round is reproducible and leaves the caller's RNG state as it was.
    """
    task = task or CLASSIFICATION
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    gen = torch.Generator().manual_seed(int(seed))
    data = task.prepare(x, y, device)
    n = task.num_examples(x, y)
    warm, clip = int(settings.warmup_steps or 0), settings.max_grad_norm
    model.train()
    total, count, steps = 0.0, 0, 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(derive_seed(int(seed), DROPOUT_STREAM))
        for idx in _batches(n, settings, gen):
            if warm:
                for group in opt.param_groups:
                    group["lr"] = _lr_at(settings, steps)
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, task.batch(data, idx, device))
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(total / max(count, 1), int(n), steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Any, y: torch.Tensor | None, device: torch.device,
    batch_size: int = 1024, task: Task | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` under ``task`` (default:
    classification: cross-entropy and accuracy); ``task.evaluate`` has every metric."""
    metrics = (task or CLASSIFICATION).evaluate(model, x, y, device, batch_size)
    return metrics["eval_loss"], metrics["eval_accuracy"]
