"""The client side of ``secagg=plus``: Flower's ``secaggplus_mod`` around fedrac's handler.

``secaggplus_mod`` runs Flower's SecAgg+ client protocol (keys, shares, masking, unmasking)
and, in its masked-vector stage, reads the reply of the app as a legacy ``FitRes``.
:func:`fitres_reply_mod` sits between the two and turns fedrac's reply (one ``ArrayRecord``
plus ``metrics``) into that ``FitRes``: the arrays as one list, their keys, dtypes and record
name in ``fitres.metrics`` (plain text, no data), and ``num_examples`` -- ``max_weight``
under ``privacy=dp``, where every client must weigh the same (the client has clipped its
update), so that SecAgg+'s weight ratio is 1 and its quantisation step the finest.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord

from fedrac.privacy.secagg import DTYPES_KEY, KEYS_KEY, RECORD_KEY
from fedrac.settings.typed import Settings


def fitres_reply_mod(settings_of: Callable[[Context], Settings | None]):
    """A mod turning fedrac's train reply into the ``FitRes`` records ``secaggplus_mod`` reads."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        out = call_next(msg, ctxt)
        if msg.metadata.message_type != MessageType.TRAIN or out.has_error():
            return out
        from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
        from flwr.compat.common import recorddict_compat as compat

        content = out.content
        (name, record), = [(k, r) for k, r in content.items() if isinstance(r, ArrayRecord)]
        metrics = next(r for r in content.values() if isinstance(r, MetricRecord))
        arrays = [a.numpy() for a in record.values()]
        settings = settings_of(ctxt)
        private = settings is not None and settings.privacy.mode == "dp"
        # under DP every client weighs the same: max_weight, so SecAgg+'s weight ratio is 1
        weight = int(float(settings.privacy.secagg_options["max_weight"])) if private else \
            int(metrics["num-examples"])
        fit_metrics = {**{k: v for k, v in metrics.items() if isinstance(v, int | float)},
                       RECORD_KEY: name, KEYS_KEY: json.dumps(list(record.keys())),
                       DTYPES_KEY: json.dumps([str(a.dtype) for a in arrays])}
        fitres = FitRes(Status(Code.OK, "Success"),
                        Parameters([ndarray_to_bytes(a) for a in arrays], "numpy.ndarray"),
                        weight, fit_metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return mod


def secagg_mod(settings_of: Callable[[Context], Settings | None]):
    """One mod for every ClientApp: SecAgg+ when the run's settings say ``secagg=plus``
    (this node's own composed config; ``None``: not asked for), else a pass-through."""
    from flwr.client.mod import secaggplus_mod
    from flwr.client.mod.utils import make_ffn

    reply_mod = fitres_reply_mod(settings_of)

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        settings = settings_of(ctxt)
        if settings is None or settings.privacy.secagg != "plus":
            return call_next(msg, ctxt)
        return make_ffn(call_next, [secaggplus_mod, reply_mod])(msg, ctxt)

    return mod
