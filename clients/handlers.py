"""Module-level train/evaluate handlers the ClientApp calls (importable in Ray workers).

A train message's ``config`` names the ``mode``:
- ``full``: train every weight, reply ``arrays`` (the whole state dict);
- ``adapters``: wrap the target layers with LoRA; for each layer the factor named
  by ``train-factor`` starts at zero (or from ``adapters`` when the server sends
  it) and is trained; the other factor is the sketch regenerated from the
  ``sketch`` record's seed (checked against its ``fingerprint``), or taken from
  ``adapters`` when sent. With ``train-factor=both`` an unsent factor named by
  ``zero-factor`` (default ``B``) starts at zero and the other comes from the
  sketch. Reply ``factors`` holds the trained factors only.
With ``client-ranks`` in the config (Fed-RAC-LoRA's heterogeneous ranks) the node trains at
its own rank (:func:`own_rank`) against the first rows/columns of the sketch.
An optional ``update`` record is added to ``arrays`` before training: dense
``<layer>.weight`` deltas, or stacked ``<layer>.stack_B`` / ``<layer>.stack_A``
factors whose product is the delta (the server's last merge, for clients that
would keep the weights between rounds).
With ``download=delta`` the weights come as deltas over the node cache
(:mod:`clients.delta_client`); a node that cannot rebuild them replies ``resync``.
With ``model.trainable_modules`` (e.g. a new classifier head) those modules are trained
in full beside the adapters and sent back in a ``modules`` record.
Every reply carries a ``metrics`` record: ``num-examples``, ``train-loss``,
``train-seconds``, ``train-steps``. Loss, batching and metrics come from the run's task
(:mod:`fedrac.tasks`).
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import nn

from clients.delta_client import downloaded_weights, restore_config, resync_reply
from clients.fed_sb import init_upload, with_frame
from fedrac.adapters import (
    LayerSpec,
    adapter_factors,
    attach_adapters,
    find_target_layers,
    remove_adapters,
    resolve_trained,
)
from fedrac.adapters.quantized import load_state, trim_heap
from fedrac.adapters.sketch import check_fingerprint, derive_seed, make_sketch, sketch_fingerprint
from fedrac.data import load_dataset_from_path, partition, to_tensors
from fedrac.models.shared import config_model as client_model
from fedrac.models.shared import module_keys, shared_model
from fedrac.privacy.dp import LOCAL_STREAM, PrivacySettings, privacy_settings
from fedrac.settings.typed import DataSettings, Settings
from fedrac.tasks import task_of
from fedrac.training.local import (
    TrainResult,
    TrainSettings,
    evaluate,
    layer_gradients,
    move_to,
    resolve_device,
    train_locally,
)
from fedrac.wire.delta_sync import ResyncNeeded
from fedrac.wire.delta_sync import apply_update as apply_update_record
from fedrac.wire.records import to_array_record, to_shared_state_dict, to_state_dict

SHUFFLE_STREAM = 2  # derive_seed(run_seed, round, SHUFFLE_STREAM, partition) shuffles batches


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


_data_keys: dict[int, tuple[DataSettings, str]] = {}


def _data_key(data: DataSettings) -> str:
    """``_key`` of the dataset/partitioner settings, computed once per settings object."""
    entry = _data_keys.get(id(data))
    if entry is None or entry[0] is not data:
        if len(_data_keys) > 16:
            _data_keys.clear()
        entry = (data, _key(data.dataset, data.partitioner))
        _data_keys[id(data)] = entry  # holds data, so its id is not reused while cached
    return entry[1]


_model = shared_model  # the process's one model instance (fedrac.models.shared)


def client_data(settings: Settings, context: Context, split: str = "train",
                config: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's data (``train`` or ``val`` part) as tensors: its own ``data-path`` (all of
    it, for either part, standardised with the run's statistics from the message ``config``),
    else the partition named by ``partition-id`` / ``num-partitions``."""
    node_cfg = context.node_config
    if "data-path" in node_cfg:
        return to_tensors(load_dataset_from_path(str(node_cfg["data-path"]),
                                                 settings.data.dataset, config))
    for key in ("partition-id", "num-partitions"):
        if key not in node_cfg:
            raise KeyError(f"node config lacks '{key}'; give it with --node-config "
                           "'partition-id=0 num-partitions=N'")
    return _partition_tensors(_data_key(settings.data),
                              int(node_cfg["num-partitions"]), int(node_cfg["partition-id"]),
                              settings.run.seed, split)


@functools.lru_cache(maxsize=64)
def _partition_tensors(
    key: str, num_partitions: int, partition_id: int, seed: int, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition's tensors, cached for the nodes this process served last (bounded)."""
    dataset_cfg, part_cfg = json.loads(key)
    return to_tensors(partition(dataset_cfg, part_cfg, num_partitions, partition_id, seed, split))


def node_stream(context: Context) -> int:
    """A stable per-node integer for seeding: ``partition-id``, else a hash of ``data-path``."""
    node_cfg = context.node_config
    if "partition-id" in node_cfg:
        return int(node_cfg["partition-id"])
    return zlib.crc32(str(node_cfg.get("data-path", context.node_id)).encode())


def settings_from(config: Mapping[str, Any]) -> TrainSettings:
    """Local training settings from a train message's ``config`` record."""
    lr = config.get("full-lr") if config.get("mode") == "full" and "full-lr" in config else \
        config.get("lr", 0.01)
    clip = config.get("max-grad-norm")
    return TrainSettings(
        optimizer=str(config.get("optimizer", "adamw")), lr=float(lr),
        local_epochs=int(config.get("local-epochs", 1)),
        local_steps=int(config.get("local-steps", 0)) or None,
        batch_size=int(config.get("batch-size", 16)),
        weight_decay=float(config.get("weight-decay", 0.0)),
        weight_decay_mode=str(config.get("weight-decay-mode", "auto")),
        momentum=float(config.get("momentum", 0.0)),
        warmup_steps=int(config.get("warmup-steps", 0)),
        max_grad_norm=None if clip is None else float(clip),
        refactor=str(config.get("refactor", "none")),
        refactor_eps=float(config.get("refactor-eps", 1e-12)),
        refactor_interval=int(config.get("refactor-interval", 1)),
        refactor_warmup_steps=int(config.get("refactor-warmup-steps", 0)),
        projected_step=bool(config.get("projected-step", False)),
        precision=str(config.get("precision", "fp32")),
        grad_accum_steps=int(config.get("grad-accum-steps", 1)),
    )


def own_rank(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> int | None:
    """This node's LoRA rank under heterogeneous ranks (``client-ranks`` in the config), else
    ``None``: the node config's ``lora-rank`` when set; else, with ``partition-id`` of
    ``num-partitions``, ``client-ranks[partition-id]`` when the list has one rank per
    partition, or tier ``partition-id * len // num-partitions`` of a shorter list (contiguous
    blocks); else the full ``rank``."""
    if "client-ranks" not in config:
        return None
    ranks = [int(r) for r in config["client-ranks"]]
    if "lora-rank" in node_config:
        mine = int(node_config["lora-rank"])
    elif "partition-id" in node_config and "num-partitions" in node_config:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        mine = ranks[pid] if len(ranks) == n else ranks[min(pid * len(ranks) // n, len(ranks) - 1)]
    else:
        mine = int(config["rank"])
    if not 1 <= mine <= int(config["rank"]):
        raise ValueError(f"lora-rank={mine} is not allowed; allowed: 1..{int(config['rank'])}")
    return mine


def prepare_adapters(
    model: nn.Module, layers: Mapping[str, LayerSpec], content: RecordDict, server_round: int,
    rank_k: int | None = None,
) -> None:
    """Attach this round's adapters: sent factors, zero-initialised trained factors and the
    sketches regenerated from the seed (checked against the fingerprint). ``rank_k``
    (heterogeneous ranks): train ``rank_k`` of the sketch's ``rank`` rows/columns, the first
    ones, at the run's scale ``alpha / rank``."""
    config = content["config"]
    rank, alpha = int(config["rank"]), float(config["alpha"])
    mine = rank if rank_k is None else int(rank_k)
    sent = to_state_dict(content["adapters"]) if "adapters" in content else {}
    sketch = content["sketch"] if "sketch" in content else None
    zero_side = str(config.get("zero-factor", "B"))
    if str(config["train-factor"]) == "R":  # Fed-SB: B and A sent, R (r x r) from zero
        attach_adapters(model, layers, {n: (sent[f"{n}.lora_A"], sent[f"{n}.lora_B"])
                                        for n in layers}, rank, alpha,
                        dict.fromkeys(layers, "R"), {n: torch.zeros(rank, rank) for n in layers})
        return
    factors, trained, sketched = {}, {}, {}
    for name, spec in layers.items():
        trained[name] = resolve_trained(spec, str(config["train-factor"]))
        pair = []
        for side in ("A", "B"):
            key, shape = f"{name}.lora_{side}", spec.factor_shape(side, rank)
            if key in sent:
                if mine != rank:
                    raise ValueError(f"round {server_round}: heterogeneous ranks need sketched "
                                     f"factors, but '{key}' was sent")
                pair.append(sent[key])
            elif side == trained[name] or (side == zero_side and trained[name] == "both"):
                # zero-init: the round starts at the global W
                pair.append(torch.zeros(spec.factor_shape(side, mine)))
            else:
                if sketch is None:
                    raise KeyError(f"round {server_round}: no sketch record and no '{key}' sent")
                sketched[key] = shape
                full = make_sketch(int(sketch["seed"]), key, shape, str(sketch["distribution"]))
                pair.append(full if mine == rank else
                            (full[:mine] if side == "A" else full[:, :mine]).contiguous())
        factors[name] = (pair[0], pair[1])
    if sketch is not None:
        check_fingerprint(str(sketch["fingerprint"]),
                          sketch_fingerprint(int(sketch["seed"]), sketched,
                                             str(sketch["distribution"])), server_round)
    attach_adapters(model, layers, factors, rank, alpha, trained)


def global_state(content: RecordDict) -> dict[str, torch.Tensor]:
    """The message's ``arrays`` with its optional ``update`` record applied."""
    return apply_update(to_state_dict(content["arrays"]), content)


def apply_update(state: dict[str, torch.Tensor], content: RecordDict,
                 layers: Mapping[str, LayerSpec] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with the message's optional ``update`` record (dense or stacked) added by
    :func:`fedrac.wire.delta_sync.apply_update`, the function the server merges with."""
    if "update" not in content:
        return state
    return apply_update_record(state, to_state_dict(content["update"]), layers)


@dataclass
class TrainStart:
    """A train message made ready: the model at the round's starting weights, on its device."""

    config: Any
    server_round: int
    model: nn.Module
    layers: dict[str, Any]
    start: dict[str, torch.Tensor]
    x: Any
    y: Any
    seed: int


def prepare_train(settings: Settings, msg: Message, context: Context,
                  device: torch.device) -> TrainStart | Message:
    """The round's starting point for ``msg`` (or the resync reply when the node's cache is
    behind): shared by :func:`handle_train` and the batched clients."""
    content = msg.content
    try:
        restore_config(content, context)
    except ResyncNeeded as err:
        return resync_reply(msg, err)
    config = content["config"]
    server_round = int(config["server-round"])
    model = client_model(settings)
    remove_adapters(model)  # in case an earlier round failed half-way
    layers = find_target_layers(model, settings.model.target_modules)
    try:
        weights = downloaded_weights(content, context, layers)
    except ResyncNeeded as err:
        return resync_reply(msg, err)
    start = apply_update(weights, content, layers)
    load_state(model, start)
    move_to(model, device)
    x, y = client_data(settings, context, config=config)
    seed = derive_seed(settings.run.seed, server_round, SHUFFLE_STREAM, node_stream(context))
    return TrainStart(config, server_round, model, layers, start, x, y, seed)


def handle_train(settings: Settings, msg: Message, context: Context) -> Message:
    """Train locally as the message's ``config`` says and reply with what the server needs."""
    content = msg.content
    device = resolve_device(settings.run.device)
    ready = prepare_train(settings, msg, context, device)
    if isinstance(ready, Message):
        return ready
    config, server_round, model = ready.config, ready.server_round, ready.model
    layers = ready.layers
    start, x, y, seed = ready.start, ready.x, ready.y, ready.seed
    mode, task = str(config["mode"]), task_of(settings.data)
    records: dict[str, Any] = {}
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        result = train_locally(model, x, y, settings_from(config), seed, device, task)
        reply_key = "arrays"
        out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    elif mode == "gradient":  # Fed-SB's init: the target layers' mean gradient (or its SVD)
        out = init_upload(layer_gradients(model, layers, x, y, int(config["init-samples"]),
                                          seed, device, task), config)
        result = TrainResult(0.0, min(int(config["init-samples"]), task.num_examples(x, y)),
                             0, 0.0)
        reply_key = "gradient"
    elif mode == "adapters":
        if str(config["train-factor"]) == "R":
            content = with_frame(content, context)
        prepare_adapters(model, layers, content, server_round,
                         own_rank(config, context.node_config))
        start = {k: v.detach().cpu().clone() for k, v in adapter_factors(model).items()}
        modules = module_keys(model, settings.model)
        for p in modules.values():
            p.requires_grad_(True)
        try:
            result = train_locally(model, x, y, settings_from(config), seed, device, task)
            out = adapter_factors(model, trained_only=True)
            if modules:
                records["modules"] = to_array_record(
                    {k: p.detach().to("cpu", torch.float32) for k, p in modules.items()})
        finally:
            remove_adapters(model)
        reply_key = "factors"
    else:
        raise ValueError(f"config mode={mode!r} is not allowed; allowed: full, adapters, "
                         "gradient")
    trim_heap()  # the step's activations and the optimizer's moments, freed, handed back
    out = local_privacy(settings, out, start, server_round, context)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "train-seconds": result.seconds, "train-steps": result.steps})
    return bind_reply(msg, Message(RecordDict({reply_key: to_array_record(out), **records,
                                               "metrics": metrics}), reply_to=msg))


def bind_reply(msg: Message, reply: Message) -> Message:
    """``reply`` with the round and nonce of the train message it answers echoed in its
    metrics (``server-round``, ``round-nonce``): the server drops a reply naming another
    round as stale. Error replies and replies without one metrics record pass unchanged."""
    config = msg.content.config_records.get("config") if not msg.has_error() else None
    if reply.has_error() or config is None:
        return reply
    metrics = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
    if len(metrics) == 1:
        for key in ("server-round", "round-nonce"):
            if key in config:
                metrics[0][key] = int(config[key])
    return reply


def local_privacy(settings: Settings, out: dict[str, torch.Tensor],
                  start: Mapping[str, torch.Tensor], server_round: int,
                  context: Context) -> dict[str, torch.Tensor]:
    """Under ``privacy=local_dp`` (this node's own config, not the server's word): the reply
    clipped and noised around what the client started from (:func:`fedrac.privacy.dp.
    privatize_update`), seeded by ``(run seed, round, node)``; under ``privacy=dp`` with
    ``secagg=plus`` clipped only (the server adds the noise); otherwise ``out`` unchanged."""
    mode = settings.privacy.mode
    secagg = settings.privacy.secagg == "plus"
    if mode != "local_dp" and not (mode == "dp" and secagg):
        return out
    from fedrac.privacy.dp import privatize_update

    s = _local_settings(settings)
    seed = derive_seed(settings.run.seed, server_round, LOCAL_STREAM, node_stream(context))
    # central DP under SecAgg+: the server never sees an update, so the client clips it
    sigma = s.noise_multiplier if mode == "local_dp" else 0.0
    return privatize_update(out, start, s.clip_norm, sigma, seed)


_local_cache: dict[str, PrivacySettings] = {}


def _local_settings(settings: Settings) -> PrivacySettings:
    """The node's privacy settings (noise multiplier resolved), once per privacy group,
    clients, rounds and sampled fraction."""
    run = settings.run
    key = _key(settings.privacy.privacy, run.num_clients, run.num_rounds, run.fraction_train)
    if key not in _local_cache:
        if len(_local_cache) >= 8:
            _local_cache.clear()
        _local_cache[key] = privacy_settings(settings)
    return _local_cache[key]


def handle_evaluate(settings: Settings, msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on this node's partition."""
    device = resolve_device(settings.run.device)
    model = client_model(settings)
    load_state(model, to_shared_state_dict(msg.content["arrays"]))
    move_to(model, device)
    x, y = client_data(settings, context, "val", msg.content.config_records.get("config"))
    loss, acc = evaluate(model, x, y, device, task=task_of(settings.data))
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-accuracy": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
