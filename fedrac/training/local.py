"""The local training loop and evaluation, shared by clients, pretraining and the server."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedrac.adapters.projected_step import ProjectedStep
from fedrac.adapters.reflora import Refactorer, trained_pairs
from fedrac.adapters.sketch import derive_seed
from fedrac.tasks import CLASSIFICATION, Task

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
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
    ``refactor``: ``none``, ``reflora`` or ``reflora_s`` (:mod:`fedrac.adapters.reflora`, on the
    adapters whose two factors train) with its ``eps``, ``interval`` and ``warmup_steps``;
    ``projected_step``: precondition a lone trained factor by its sketch's inverse Gram
    matrix (:mod:`fedrac.adapters.projected_step`).
    ``precision``: ``fp32``, or ``bf16`` / ``fp16`` autocast on the run's device (the adapter
    factors stay fp32; ``fp16`` adds a gradient scaler); ``grad_accum_steps``: micro-batches of
    ``batch_size`` per optimizer step (the effective batch is their product; ``local_steps``
    counts optimizer steps).
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
    refactor: str = "none"
    refactor_eps: float = 1e-12
    refactor_interval: int = 1
    refactor_warmup_steps: int = 0
    projected_step: bool = False
    precision: str = "fp32"
    grad_accum_steps: int = 1


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


def check_precision(precision: str, grad_accum_steps: Any, device: torch.device) -> None:
    """Raise (one line naming the key) unless ``precision`` is one of :data:`PRECISIONS` that
    ``device`` serves (``fp16`` needs CUDA, ``bf16`` on CUDA a GPU with bfloat16) and
    ``grad_accum_steps`` is an integer >= 1."""
    if precision not in PRECISIONS:
        raise ValueError(f"client.precision={precision!r} is not allowed; allowed: "
                         f"{', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"client.precision=fp16 is not allowed on device {device.type}; "
                         "allowed: fp32, bf16 (fp16 autocast with a grad scaler needs CUDA)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"client.precision=bf16 is not allowed on {device}; allowed: fp32, "
                         "fp16 (this GPU has no bfloat16)")
    steps = grad_accum_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"client.grad_accum_steps={steps!r} is not allowed; "
                         "allowed: an integer >= 1")


def _batches(n: int, settings: TrainSettings, gen: torch.Generator):
    """Index batches of the effective size ``batch_size * grad_accum_steps``: ``local_steps``
    batches, or ``local_epochs`` passes over ``n`` items."""
    bs = max(1, min(int(settings.batch_size) * int(settings.grad_accum_steps), n))
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


class StepHooks:
    """What runs around each optimizer step: ``before_step()`` between ``backward()`` and
    ``step()``, ``after_step(opt)`` after it (RefLoRA, the projected step)."""

    def __init__(self, hooks: list) -> None:
        self.hooks = hooks

    def before_step(self) -> None:
        for hook in self.hooks:
            hook.before_step()

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for hook in self.hooks:
            hook.after_step(optimizer)


def step_hooks(model: nn.Module, settings: TrainSettings) -> StepHooks | None:
    """The step hooks ``settings`` ask for on ``model``'s adapters: the RefLoRA refactorer of
    ``settings.refactor`` (two-factor adapters) and the projected step of
    ``settings.projected_step`` (one-factor adapters); ``None`` when there are none."""
    hooks: list = []
    pairs = trained_pairs(model) if settings.refactor != "none" else []
    if pairs:
        hooks.append(Refactorer(pairs, settings.refactor, settings.refactor_eps,
                                settings.refactor_interval, settings.refactor_warmup_steps))
    if settings.projected_step:
        projected = ProjectedStep(model)
        if projected.items:
            hooks.append(projected)
    return StepHooks(hooks) if hooks else None


def _micro(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``idx`` cut into micro-batches of ``size`` (the last may be shorter)."""
    return list(idx.split(max(1, size))) if len(idx) > size else [idx]


def train_locally(
    model: nn.Module, x: Any, y: torch.Tensor | None, settings: TrainSettings,
    seed: int, device: torch.device, task: Task | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``(x, y)`` with ``task``'s loss.

    ``x`` is a dense tensor or tokenised text (:class:`fedrac.data.text.TokenData`); the
    task (default: classification) cuts and pads the batches. Batch order comes from
    ``seed``; torch's own RNG (dropout) is seeded from it too, inside this call only, so a
    client round is reproducible and leaves the caller's RNG state as it was.
    Each optimizer step takes ``grad_accum_steps`` micro-batches, each loss weighted by its
    ``task.loss_weight`` (examples; loss tokens for causal_lm) and the gradient divided by
    their sum, so it is the effective batch's own; under ``precision``'s autocast. The loss
    is summed on the device and read once at the end.
    """
    task = task or CLASSIFICATION
    check_precision(settings.precision, settings.grad_accum_steps, device)
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    gen = torch.Generator().manual_seed(int(seed))
    data = task.prepare(x, y, device)
    n = task.num_examples(x, y)
    warm, clip = int(settings.warmup_steps or 0), settings.max_grad_norm
    hooks = step_hooks(model, settings)
    amp_dtype = PRECISIONS[settings.precision]
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    accumulate = int(settings.grad_accum_steps) > 1
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)  # read once, at the end
    count, steps = 0, 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(derive_seed(int(seed), DROPOUT_STREAM))
        for idx in _batches(n, settings, gen):
            if warm:
                for group in opt.param_groups:
                    group["lr"] = _lr_at(settings, steps)
            opt.zero_grad(set_to_none=True)
            weight: Any = 0
            for part in _micro(idx, int(settings.batch_size)):
                batch = task.batch(data, part, device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = task.loss(model, batch)
                share = loss.float()
                if accumulate:
                    w = task.loss_weight(batch)
                    weight, share = weight + w, share * w
                (share if scaler is None else scaler.scale(share)).backward()
                total += loss.detach().double() * len(part)
            if scaler is not None:
                scaler.unscale_(opt)
            if accumulate:  # sum_i w_i grad(loss_i) / sum_i w_i: the effective batch's gradient
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(weight)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            if hooks is not None:
                hooks.before_step()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            if hooks is not None:
                hooks.after_step(opt)
            count += len(idx)
            steps += 1
    mean = float(total) / max(count, 1)  # the one host synchronisation of the loop
    return TrainResult(mean, int(n), steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Any, y: torch.Tensor | None, device: torch.device,
    batch_size: int = 1024, task: Task | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` under ``task`` (default:
    classification: cross-entropy and accuracy); ``task.evaluate`` has every metric."""
    metrics = (task or CLASSIFICATION).evaluate(model, x, y, device, batch_size)
    return metrics["eval_loss"], metrics["eval_accuracy"]


def layer_gradients(
    model: nn.Module, layers: Any, x: Any, y: torch.Tensor | None, samples: int, seed: int,
    device: torch.device, task: Task | None = None, batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": g}``: the gradient of the mean loss over up to ``samples``
    examples (drawn from ``seed``) with respect to each target layer's weight, laid out
    ``d_out x d_in`` (float32, CPU). No parameter changes; only those weights take a grad."""
    task = task or CLASSIFICATION
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in layers}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        if not w.is_floating_point():
            raise ValueError("strategy=fed_sb needs the target layers' gradients; a quantised "
                             "weight has none (model.quantization=none)")
        w.requires_grad_(True)
        w.grad = None
    n = task.num_examples(x, y)
    take = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:samples]
    data = task.prepare(x, y, device)
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(int(seed), DROPOUT_STREAM))
        for part in _micro(take, batch_size):
            loss = task.loss(model, task.batch(data, part, device))
            (loss.float() * (len(part) / len(take))).backward()
    out = {}
    for name, w in weights.items():
        g = w.grad.detach().to("cpu", torch.float32)
        out[f"{name}.weight"] = g.T.contiguous() if layers[name].transposed else \
            g.reshape(g.shape[0], -1)
        w.grad = None
        w.requires_grad_(False)
    return out
