"""Client side of ``strategy=fed_sb``: the fixed ``B`` and ``A`` kept in the node's state.

The server sends a node the run's fixed factors (record ``adapters``) once, with their
fingerprint in every train message's ``config`` (``frame-fingerprint``). The node keeps them
in ``Context.state`` and fills later messages from there; a node whose state holds no factors
of that fingerprint (a restarted process, another run) fails the round with a one-line
reason, and the server sends it the factors again the next time it samples it.

LoRA-SB's init: a node asked for its gradient with ``init-rank`` and ``init-step`` in the
config (the only init client) replies with the truncated SVD of ``-init_step * sign(G)``
per layer (``<layer>.init_U``, ``.init_S``, ``.init_Vh``) instead of the full gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedrac.adapters.lora_sb import INIT_RANK_KEY, INIT_STEP_KEY, SVD_PARTS, signed_step_svd
from fedrac.adapters.sketch import fingerprint
from fedrac.wire.records import to_shared_state_dict

FRAME_KEY = "adapters"  # the record of the fixed factors in a train message
STATE_FRAME = "fed-sb-frame"  # where the node keeps them
STATE_FINGERPRINT = "fed-sb-frame-fingerprint"  # and their fingerprint, hashed once
FINGERPRINT_KEY = "frame-fingerprint"  # config key: the fingerprint of the run's factors


def init_upload(gradients: Mapping[str, torch.Tensor], config: Mapping[str, Any]
                ) -> dict[str, torch.Tensor]:
    """What a gradient request is answered with: ``gradients`` (``<layer>.weight``), or,
    when the config names ``init-rank``, each layer's ``U_r``, ``S_r``, ``V_rᵀ`` of
    ``-init_step * sign(G)`` (float32: ``r (d_in + d_out + 1)`` numbers, not ``d_in d_out``)."""
    if INIT_RANK_KEY not in config:
        return dict(gradients)
    rank, step = int(config[INIT_RANK_KEY]), float(config[INIT_STEP_KEY])
    out = {}
    for key, g in gradients.items():
        name = key.removesuffix(".weight")
        parts = signed_step_svd(g, rank, step)
        out.update({f"{name}.{p}": t.float() for p, t in zip(
            SVD_PARTS, parts, strict=True)})
    return out


def _kept(context: Context) -> tuple[ArrayRecord | None, str | None]:
    """The node's kept ``B``, ``A`` record and its fingerprint (``None`` where it has none)."""
    record = context.state[STATE_FRAME] if STATE_FRAME in context.state else None
    if not isinstance(record, ArrayRecord):
        return None, None
    kept = context.state[STATE_FINGERPRINT] if STATE_FINGERPRINT in context.state else None
    return record, str(kept["fingerprint"]) if isinstance(kept, ConfigRecord) else \
        fingerprint(to_shared_state_dict(record))


def held_frame(content: RecordDict, context: Context) -> dict[str, torch.Tensor] | None:
    """The run's fixed ``B``, ``A`` (read-only views) for rebuilding the weights from deltas:
    the sent ones, or the node's of the fingerprint the config names (``None``: it holds
    none)."""
    want = content["config"].get(FINGERPRINT_KEY) if "config" in content else None
    if want is None:
        return None
    if FRAME_KEY in content:
        frame = to_shared_state_dict(content[FRAME_KEY])
        return frame if fingerprint(frame) == str(want) else None
    record, got = _kept(context)
    return to_shared_state_dict(record) if record is not None and got == str(want) else None


def with_frame(content: RecordDict, context: Context) -> RecordDict:
    """``content`` holding the fixed factors: sent ones are checked and kept in the node's
    state; otherwise they are taken from there (``RuntimeError`` when it holds none of the
    fingerprint the config names)."""
    want = str(content["config"][FINGERPRINT_KEY])
    if FRAME_KEY in content:
        got = fingerprint(to_shared_state_dict(content[FRAME_KEY]))
        if got != want:
            raise RuntimeError(f"fed_sb: the sent B, A have fingerprint {got}, the config "
                               f"names {want}")
        context.state[STATE_FRAME] = content[FRAME_KEY]
        context.state[STATE_FINGERPRINT] = ConfigRecord({"fingerprint": got})
        return content
    cached, got = _kept(context)
    if cached is None or got != want:
        raise RuntimeError("fed_sb: this node holds no B, A of this run (the server sends "
                           "them again next time)")
    out = RecordDict(dict(content.items()))
    out[FRAME_KEY] = cached
    return out
