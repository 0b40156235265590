"""Client side of ``strategy.download=delta``: rebuild the global weights from the node cache.

The node keeps the global weights it last had in ``Context.state`` (persisted between
rounds by every Flower engine). A message with ``deltas`` is replayed on that cache with
the server's own merges (:func:`fedrac.wire.delta_sync.apply_deltas`) and checked against the
sent checksum, which also covers the train config completed from the cache; any problem
raises :class:`~fedrac.wire.delta_sync.ResyncNeeded`, which the
handler turns into a ``resync`` reply so the server sends the full weights. Nodes of one
process (the inline engine) that rebuild the same weights from the same cached Arrays share
the result: one copy per version, not one per node.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.fed_sb import held_frame
from fedrac.adapters import LayerSpec
from fedrac.wire.delta_sync import (
    STATE_CONFIG,
    STATE_SYNC,
    STATE_WEIGHTS,
    ResyncNeeded,
    apply_deltas,
    is_middle_key,
    sync_checksum,
)
from fedrac.wire.records import to_array_record, to_shared_state_dict, to_state_dict
from strategies.delta_sync import RESYNC_KEY


def _cached(context: Context, base: int) -> dict[str, torch.Tensor]:
    state = context.state
    if STATE_WEIGHTS not in state or STATE_SYNC not in state:
        raise ResyncNeeded("no cached weights on this node")
    version = state[STATE_SYNC].get("version") if isinstance(state[STATE_SYNC],
                                                             ConfigRecord) else None
    if version != base:
        raise ResyncNeeded(f"cache holds version {version}, the deltas start from {base}")
    try:
        return to_shared_state_dict(state[STATE_WEIGHTS])
    except Exception as err:  # an unreadable cache is a cache miss, not a crash
        raise ResyncNeeded(f"cached weights unreadable ({type(err).__name__})") from err


# checksum -> (the cached Arrays rebuilt from, the rebuilt weights), the last of this process
_rebuilt: dict[str, tuple[tuple, ArrayRecord]] = {}


def _arrays_of(context: Context) -> tuple | None:
    """The Array objects of the node's cached weights (the inline engine shares them between
    the copies of a context it makes; their bytes are immutable)."""
    record = context.state[STATE_WEIGHTS] if STATE_WEIGHTS in context.state else None
    return tuple(record.values()) if isinstance(record, ArrayRecord) else None


def _version(context: Context) -> int | None:
    sync = context.state[STATE_SYNC] if STATE_SYNC in context.state else None
    return sync.get("version") if isinstance(sync, ConfigRecord) else None


def restore_config(content: RecordDict, context: Context) -> None:
    """Complete a delta message's slim ``config`` from the node cache (in place)."""
    if "deltas" not in content:
        return
    if STATE_CONFIG not in context.state or \
            not isinstance(context.state[STATE_CONFIG], ConfigRecord):
        raise ResyncNeeded("no cached train config on this node")
    content["config"] = ConfigRecord({**context.state[STATE_CONFIG], **content["config"]})


def downloaded_weights(
    content: RecordDict, context: Context, layers: Mapping[str, LayerSpec]
) -> dict[str, torch.Tensor]:
    """The global weights this message describes (full, or rebuilt from cache and deltas).

    The tensors may be shared with other calls: replace entries, never modify them in place.

    With a ``sync`` record the result is stored in the node cache as version
    ``server-round - 1`` (the weights after the previous round).
    """
    if "sync" not in content:
        return to_shared_state_dict(content["arrays"])
    sync = content["sync"]
    if "arrays" in content:
        record = content["arrays"]
        state = to_shared_state_dict(record)  # read-only views: no copy of the model
        context.state[STATE_CONFIG] = ConfigRecord(dict(content["config"]))
    else:
        config = content["config"]
        checksum = str(sync["checksum"])
        cache = _arrays_of(context)
        shared = _rebuilt.get(checksum)
        if shared is not None and cache is not None and len(cache) == len(shared[0]) and \
                all(a is b for a, b in zip(cache, shared[0], strict=True)) and \
                int(sync["base"]) == _version(context):
            # another node of this process rebuilt these weights from the very same cached
            # record (the inline engine): share the result instead of holding a copy per node
            record = shared[1]
            state = to_shared_state_dict(record)
        else:
            distribution = str(content["sketch"]["distribution"]) if "sketch" in content \
                else None
            deltas = to_state_dict(content["deltas"])
            frame = held_frame(content, context) if any(map(is_middle_key, deltas)) else None
            state = apply_deltas(
                _cached(context, int(sync["base"])), layers, deltas,
                [int(r) for r in sync["rounds"]], [int(s) for s in sync["seeds"]],
                int(config["rank"]), float(config["alpha"]), distribution, frame)
            got = sync_checksum(state, config)  # ``config``: completed from the node cache
            if got != checksum:
                raise ResyncNeeded(f"rebuilt weights and cached train config have checksum "
                                   f"{got}, the server's are {checksum}")
            record = to_array_record(state)
            _rebuilt.clear()
            _rebuilt[checksum] = (cache or (), record)
    context.state[STATE_WEIGHTS] = record
    context.state[STATE_SYNC] = ConfigRecord(
        {"version": int(content["config"]["server-round"]) - 1})
    return state


def resync_reply(msg: Message, err: Exception) -> Message:
    """The reply asking the server for the full weights."""
    return Message(RecordDict({RESYNC_KEY: ConfigRecord({"reason": str(err)})}), reply_to=msg)
