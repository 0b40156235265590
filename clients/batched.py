"""Batched clients (``engine.batched=true``): a round's train messages in one ``torch.func`` pass.

The inline engine hands :func:`batch_trainer`'s handler all of a round's train messages
together. Each message is prepared exactly as :func:`clients.handlers.handle_train` prepares
it (delta download, ``update`` record, sketch and fingerprint check, zero-init factors, the
node's partition and batch seed); messages whose clients share architecture and settings
(the whole ``config`` record, the records sent, the tensors' names, shapes and dtypes) are
trained together: ``vmap(grad_and_value(loss))`` over the clients' trained tensors (fedavg:
every weight; LoRA methods: the trained factors, with the frozen base and the sketch passed
once when all clients hold the same), through ``torch.func.functional_call`` on the one
process model. The optimizer is functional, per client state, step for step the arithmetic
of ``torch.optim.SGD`` (momentum, weight decay) and ``torch.optim.AdamW``, with the same
warm-up and gradient clipping as :func:`fedrac.training.local.train_locally`.

Clients of unequal data sizes and step counts: every step cuts each client's own next
batch (same seed, same order as the sequential loop); a step whose batches differ in length
runs once per length (padding would change the matrix products' summation and so the bits;
a length only one client has runs unbatched), and a client whose steps are done keeps its
tensors and optimizer state (its update that step is masked out). Each message gets the
reply ``handle_train`` would build (records, keys, dtypes, metrics); ``train-seconds`` is
the client's share of the batch's time. Exactness: docs/batched.md.

What cannot be batched goes through the sequential ClientApp, with one log line naming
why: a custom (``_target_``) or ``hf`` model, a task other than classification, local DP
or SecAgg+, layers that are not functions of their inputs and weights (BatchNorm, dropout),
text data, and a client whose settings no other client of the round shares.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from clients.handlers import (
    client_model,
    prepare_adapters,
    prepare_train,
    settings_from,
)
from fedrac.adapters import LayerSpec, attach_adapters, attached, remove_adapters
from fedrac.adapters.layer import ADAPTER_ATTR
from fedrac.settings.typed import Settings
from fedrac.tasks import task_of
from fedrac.training.local import TrainSettings, _batches, _lr_at, move_to, resolve_device
from fedrac.wire.records import to_array_record

log = logging.getLogger("fedrac.batched")

BATCHABLE_MODELS = ("mlp", "cnn", "vit_tiny")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults (make_optimizer)
_NOT_FUNCTIONAL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.modules.dropout._DropoutNd)
_logged: set[str] = set()

BatchHandler = Callable[[Sequence[tuple[Message, Context]]], list[Message | None]]


def note(reason: str) -> None:
    """Log ``reason`` (why clients train one by one) once per process."""
    if reason not in _logged:
        _logged.add(reason)
        log.warning("engine.batched: %s; those clients train one by one", reason)


def run_reason(settings: Settings) -> str | None:
    """Why no client of this run can be batched (``None``: batching is possible)."""
    model = settings.model.options
    if model.get("_target_"):
        return f"model._target_={model['_target_']} is a custom model"
    if settings.model.name not in BATCHABLE_MODELS:
        return f"model={settings.model.name} is not one of {', '.join(BATCHABLE_MODELS)}"
    if task_of(settings.data).name != "classification":
        return f"task={task_of(settings.data).name} is not classification"
    client = settings.client
    if client.precision != "fp32" or int(client.grad_accum_steps) != 1:
        return "client.precision / client.grad_accum_steps are not batched"
    if settings.privacy.mode == "local_dp":
        return "privacy=local_dp noises each client's update on the client"
    if settings.privacy.secagg != "none":
        return "secagg=plus masks each reply in the ClientApp's SecAgg+ mod"
    layers = [type(m).__name__ for m in client_model(settings).modules()
              if isinstance(m, _NOT_FUNCTIONAL) and getattr(m, "p", 1.0) != 0.0]
    if layers:
        return f"the model has layers that are not functions of their weights ({layers[0]})"
    return None


def batch_trainer(settings: Settings) -> BatchHandler | None:
    """The inline engine's batch handler for a run's settings (``None``, after one log
    line, when nothing of this run can be batched)."""
    reason = run_reason(settings)
    if reason is not None:
        note(reason)
        return None

    def handler(items: Sequence[tuple[Message, Context]]) -> list[Message | None]:
        return train_batch(settings, items)

    return handler


@dataclass
class _Client:
    """One train message, prepared as ``handle_train`` prepares it."""

    msg: Message
    x: torch.Tensor
    y: torch.Tensor
    seed: int
    settings: TrainSettings
    mode: str
    trained: dict[str, torch.Tensor]      # full: state keys; adapters: "<layer>.lora_A/B"
    frozen: dict[str, torch.Tensor]       # full: buffers; adapters: state + untrained factors
    key: str
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    scale: float = 1.0


def _factor_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{"<layer>.lora_A": (tensor, trained?)}`` of the attached adapters (copies)."""
    out = {}
    for name, _, adapter in attached(model):
        for side in ("lora_A", "lora_B"):
            t = getattr(adapter, side)
            out[f"{name}.{side}"] = (t.detach().clone(), isinstance(t, nn.Parameter))
    return out


def _prepare(settings: Settings, msg: Message, context: Context,
             device: torch.device) -> _Client | Message | str:
    """``msg`` ready to train (a resync reply, or a reason string when it cannot batch)."""
    content = msg.content
    ready = prepare_train(settings, msg, context, device)
    if isinstance(ready, Message):
        return ready
    config, server_round, model = ready.config, ready.server_round, ready.model
    layers = ready.layers
    start, x, y, seed = ready.start, ready.x, ready.y, ready.seed
    if not isinstance(x, torch.Tensor):
        return "the data are not dense tensors (text)"
    mode = str(config["mode"])
    if mode == "gradient" or str(config.get("train-factor")) == "R":
        return "strategy=fed_sb (a gradient or a middle factor R) is not batched"
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # the weights as loaded, shared between clients when the message's tensors are
    state = {k: (start[k] if k in start and start[k].dtype == v.dtype and
                 start[k].device == v.device else v.clone()) for k, v in state.items()}
    params = dict(model.named_parameters())
    if mode == "full":
        trained = {k: v for k, v in state.items() if k in params}
        frozen = {k: v for k, v in state.items() if k not in params}
        scale = 1.0
    elif mode == "adapters":
        prepare_adapters(model, layers, content, server_round)
        try:
            factors = _factor_tensors(model)
        finally:
            remove_adapters(model)
        trained = {k: t for k, (t, is_trained) in factors.items() if is_trained}
        frozen = {**state, **{k: t for k, (t, is_trained) in factors.items() if not is_trained}}
        scale = float(config["alpha"]) / int(config["rank"])
    else:
        return f"config mode={mode!r} is not full or adapters"
    shapes = [(k, tuple(v.shape), str(v.dtype), k in trained) for k, v in
              {**frozen, **trained}.items()]
    key = json.dumps([sorted(config.items()), sorted(content.keys()), shapes,
                      list(x.shape[1:]), str(x.dtype), str(y.dtype)], default=str)
    return _Client(msg, x, y, seed, settings_from(config), mode, trained, frozen, key,
                   dict(layers), scale)


def train_batch(settings: Settings, items: Sequence[tuple[Message, Context]]
                ) -> list[Message | None]:
    """Replies to ``items`` (``(message, node context)``): a reply for each message trained
    in a batch (or answered with ``resync``), ``None`` for each the caller must hand to the
    ClientApp one by one. Node contexts are updated as ``handle_train`` updates them."""
    device = resolve_device(settings.run.device)
    out: list[Message | None] = [None] * len(items)
    groups: dict[str, list[tuple[int, _Client]]] = {}
    for i, (msg, context) in enumerate(items):
        prepared = _prepare(settings, msg, context, device)
        if isinstance(prepared, Message):
            out[i] = prepared
        elif isinstance(prepared, str):
            note(prepared)
        else:
            groups.setdefault(prepared.key, []).append((i, prepared))
    for members in groups.values():
        if len(members) < 2:
            note("a client's settings are shared by no other client of its round")
            continue
        clients = [c for _, c in members]
        replies = _train_group(settings, clients, device)
        for (i, _), reply in zip(members, replies, strict=True):
            out[i] = reply
    return out


def _stack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([t.to(device) for t in tensors])


def _split_frozen(clients: Sequence[_Client], device: torch.device
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The frozen tensors: once where every client holds the same, else stacked."""
    shared, stacked = {}, {}
    for k, first in clients[0].frozen.items():
        if all(c.frozen[k] is first or torch.equal(c.frozen[k], first) for c in clients[1:]):
            shared[k] = first.to(device)
        else:
            stacked[k] = _stack([c.frozen[k] for c in clients], device)
    return shared, stacked


def _index_plan(clients: Sequence[_Client], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step, rows of the clients' concatenated data ``(steps, C, width)`` (padding and
    finished clients read their first row) and each client's batch size (0 once done)."""
    plans = []
    for c in clients:
        gen = torch.Generator().manual_seed(int(c.seed))
        plans.append(list(_batches(len(c.x), c.settings, gen)))
    steps = max(len(p) for p in plans)
    width = max(len(idx) for p in plans for idx in p)
    rows = torch.zeros(steps, len(clients), width, dtype=torch.long)
    sizes = torch.zeros(steps, len(clients), dtype=torch.long)
    offset = 0
    for j, (plan, c) in enumerate(zip(plans, clients, strict=True)):
        rows[:, j] = offset
        for s, idx in enumerate(plan):
            rows[s, j, :len(idx)] = idx + offset
            sizes[s, j] = len(idx)
        offset += len(c.x)
    return rows.to(device), sizes


def _module_key(key: str) -> str:
    """A factor's wire key ``<layer>.lora_A`` as the adapted model's tensor name."""
    if ".lora_" not in key:
        return key
    layer, side = key.rsplit(".", 1)
    return f"{layer}.{ADAPTER_ATTR}.{side}"


def _effective(trained: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """One client's tensors for ``functional_call`` on the model (with its adapters attached:
    the factors run on the forward path, as in :mod:`fedrac.adapters.layer`)."""
    return {_module_key(k): v for k, v in {**frozen, **trained}.items()}


def _attach_like(model: nn.Module, client: _Client) -> None:
    """Attach adapters shaped like ``client``'s factors (their values come per call)."""
    factors, trained = {}, {}
    for name in client.layers:
        a = client.trained.get(f"{name}.lora_A", client.frozen.get(f"{name}.lora_A"))
        b = client.trained.get(f"{name}.lora_B", client.frozen.get(f"{name}.lora_B"))
        factors[name] = (a, b)
        sides = [s for s in ("A", "B") if f"{name}.lora_{s}" in client.trained]
        trained[name] = "both" if len(sides) == 2 else sides[0]
    rank = int(next(iter(factors.values()))[0].shape[0])
    attach_adapters(model, client.layers, factors, rank, client.scale * rank, trained)


def _train_group(settings: Settings, clients: Sequence[_Client], device: torch.device
                 ) -> list[Message]:
    """Train ``clients`` (same settings) together; their replies."""
    start_time = time.perf_counter()
    model = client_model(settings)
    trained, results = fit(model, clients, device)
    seconds = (time.perf_counter() - start_time) / len(clients)
    replies = []
    for c, out, (loss, steps) in zip(clients, trained, results, strict=True):
        if c.mode == "full":
            reply_key = "arrays"
            out = {k: out[k] if k in out else c.frozen[k].cpu() for k in model.state_dict()}
        else:
            reply_key = "factors"
        metrics = MetricRecord({"num-examples": int(len(c.x)), "train-loss": loss,
                                "train-seconds": seconds, "train-steps": steps})
        replies.append(Message(RecordDict({reply_key: to_array_record(out), "metrics": metrics}),
                               reply_to=c.msg))
    return replies


def fit(model: nn.Module, clients: Sequence[_Client], device: torch.device
        ) -> tuple[list[dict[str, torch.Tensor]], list[tuple[float, int]]]:
    """Train ``clients`` (same settings) together on ``model`` (its own weights unused): each
    client's trained tensors (CPU) and ``(mean train loss, steps)``."""
    first = clients[0]
    mode = first.mode
    remove_adapters(model)
    move_to(model, device)
    if mode == "adapters":
        _attach_like(model, first)
    try:
        return _fit(model, clients, device)
    finally:
        remove_adapters(model)


def _fit(model: nn.Module, clients: Sequence[_Client], device: torch.device
         ) -> tuple[list[dict[str, torch.Tensor]], list[tuple[float, int]]]:
    """:func:`fit` on the model as prepared (adapters attached for LoRA methods)."""
    first = clients[0]
    settings = first.settings
    model.train()
    n_clients = len(clients)
    shared, stacked = _split_frozen(clients, device)
    names = list(first.trained)
    params = {k: _stack([c.trained[k] for c in clients], device) for k in names}
    data_x = torch.cat([c.x for c in clients]).to(device)
    data_y = torch.cat([c.y for c in clients]).to(device)
    rows, sizes = _index_plan(clients, device)
    width = rows.shape[2]

    def loss(p, frozen_stacked, x, y):
        out = functional_call(model, _effective(p, {**shared, **frozen_stacked}), (x,))
        return nn.functional.cross_entropy(out, y)

    batched_step = vmap(grad_and_value(loss))

    def step(p, frozen_stacked, x, y):
        """Per-client gradients and losses (``vmap(grad)``: the per-client kernels' bits, as
        far as observed on the built-in MLP; autograd through a vmapped forward was faster
        but rounds differently). A single client runs unbatched, the sequential path's own
        kernels."""
        if len(y) > 1:
            return batched_step(p, frozen_stacked, x, y)
        with torch.enable_grad():
            leaves = {k: v[0].detach().requires_grad_(True) for k, v in p.items()}
            value = loss(leaves, {k: v[0] for k, v in frozen_stacked.items()}, x[0], y[0])
            grads = torch.autograd.grad(value, list(leaves.values()))
        return ({k: g.unsqueeze(0) for k, g in zip(leaves, grads, strict=True)},
                value.detach().unsqueeze(0))

    opt = _Optimizer(settings, params)
    totals, counts = [0.0] * n_clients, [0] * n_clients
    for s in range(rows.shape[0]):
        size = sizes[s].tolist()
        x, y = data_x[rows[s]], data_y[rows[s]]
        if all(b == width for b in size):
            grads, losses = step(params, stacked, x, y)
            active = None
        else:
            grads, losses = _by_length(step, params, stacked, x, y, size)
            active = torch.tensor([b > 0 for b in size], device=device)
        if settings.max_grad_norm:
            grads = _clip(grads, names, float(settings.max_grad_norm))
        params = opt.step(params, grads, s, active)
        for j, (value, b) in enumerate(zip(losses.tolist(), size, strict=True)):
            if b:
                totals[j] += float(value) * b
                counts[j] += b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    trained = [{k: params[k][j].detach().to("cpu").clone() for k in names}
               for j in range(n_clients)]
    results = [(totals[j] / max(counts[j], 1), int((sizes[:, j] > 0).sum()))
               for j in range(n_clients)]
    return trained, results


def _by_length(step: Callable, params: Mapping[str, torch.Tensor],
               stacked: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               size: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``step`` on a step whose clients' batches differ in length: one call per length on
    the clients with it (a padded, masked batch would change the matrix products' summation
    and so the bits); finished clients (length 0) get zero gradients (masked later)."""
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    losses = torch.zeros(len(size), dtype=torch.float64, device=x.device)
    for b in sorted(set(size) - {0}):
        idx = torch.tensor([j for j, n in enumerate(size) if n == b], device=x.device)
        g, value = step({k: v.index_select(0, idx) for k, v in params.items()},
                        {k: v.index_select(0, idx) for k, v in stacked.items()},
                        x.index_select(0, idx)[:, :b], y.index_select(0, idx)[:, :b])
        for k in grads:
            grads[k].index_copy_(0, idx, g[k])
        losses.index_copy_(0, idx, value.to(losses.dtype))
    return grads, losses


def _clip(grads: dict[str, torch.Tensor], names: Sequence[str], max_norm: float
          ) -> dict[str, torch.Tensor]:
    """``clip_grad_norm_`` per client: the global norm over the trained tensors."""
    norms = torch.stack([torch.linalg.vector_norm(grads[k].flatten(1), dim=1) for k in names])
    total = torch.linalg.vector_norm(norms, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {k: g * coef.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


class _Optimizer:
    """Functional ``torch.optim.SGD`` / ``AdamW`` over stacked per-client tensors."""

    def __init__(self, settings: TrainSettings, params: Mapping[str, torch.Tensor]) -> None:
        self.s = settings
        self.state: dict[str, dict[str, torch.Tensor]] = {k: {} for k in params}

    def step(self, params: dict[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
             step: int, active: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Step ``step`` (0-based); clients not ``active`` keep tensors and state."""
        lr = _lr_at(self.s, step)
        out = {}
        for k, p in params.items():
            new_p, new_state = (self._sgd if self.s.optimizer == "sgd" else self._adamw)(
                p, grads[k], self.state[k], lr, step)
            if active is not None:
                keep = active.view(-1, *([1] * (p.dim() - 1)))
                new_p = torch.where(keep, new_p, p)
                new_state = {n: torch.where(keep, v, self.state[k][n]) if n in self.state[k]
                             else v for n, v in new_state.items()}
            out[k], self.state[k] = new_p, new_state
        return out

    def _sgd(self, p, g, state, lr, step):
        wd, momentum = self.s.weight_decay, self.s.momentum
        if wd != 0:
            g = g.add(p, alpha=wd)
        if momentum != 0:
            buf = state.get("momentum")
            buf = g.clone() if buf is None else buf.mul(momentum).add(g, alpha=1)
            state = {"momentum": buf}
            g = buf
        return p.add(g, alpha=-lr), state

    def _adamw(self, p, g, state, lr, step):
        beta1, beta2 = ADAM_BETAS
        wd = self.s.weight_decay
        exp_avg = state.get("exp_avg", torch.zeros_like(p))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(p))
        t = float(step + 1)
        if wd != 0:
            p = p.mul(1 - lr * wd)
        exp_avg = exp_avg.lerp(g, 1 - beta1)
        exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t) ** 0.5).add(ADAM_EPS)
        return p.addcdiv(exp_avg, denom, value=-step_size), {"exp_avg": exp_avg,
                                                             "exp_avg_sq": exp_avg_sq}
