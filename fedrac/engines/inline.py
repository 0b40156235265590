"""In-process Flower engine: a ``Grid`` that calls the ``ClientApp`` directly.

``run_inline`` runs a ``ServerApp`` against ``num_supernodes`` virtual SuperNodes in the
calling process and thread: no Ray, no gRPC, no worker threads. Every pushed message is
handled synchronously by calling the ``ClientApp`` with the destination node's ``Context``,
so a run is deterministic given the same seed (and the same global ``random`` state, which
Flower's strategies use for sampling).

Differences from Flower's Simulation Runtime, all deliberate:

* ``send_and_receive(timeout=...)`` and message TTLs do not cut a round short: every
  accepted message gets its reply, so results do not depend on wall-clock time.
* ClientApp calls are serialised; only the node ``Context`` objects persist between
  rounds. Message content is copied at the node boundary (``Array`` objects are shared,
  their bytes are immutable) so a ClientApp cannot alter the server's records, or the
  reverse.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run

log = logging.getLogger(__name__)

_ID_BITS = 63  # Flower ids are uint64 on the wire; stay in the positive int64 range.


@contextmanager
def _as_task(run_id: int, node_id: int, task_id: int) -> Iterator[None]:
    """Act as task ``task_id`` of node ``node_id`` in run ``run_id`` inside the block.

    ``Message(content, dst_node_id, message_type)`` fills ``run_id``, ``src_node_id`` and
    ``src_task_id`` from the PRIVATE, process-wide ``flwr.supercore.task_identity.TaskIdentity``.
    Flower sets it once per process because each ServerApp/ClientApp gets its own process;
    here server and clients share one, so the identity is switched around every ClientApp
    call and the caller's identity (possibly unset) is restored afterwards. This is the only
    place in fedrac that touches the private API; if Flower moves or renames it, fix it here.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def _copy_recorddict(records: RecordDict) -> RecordDict:
    """Copy ``records`` so neither side can add, drop or replace the other's entries.

    Record containers are new; ``Array`` objects are shared (their bytes are immutable and
    nothing in Flower or fedrac reassigns an Array's fields), and list values of config
    and metric records are copied. ``copy.deepcopy`` is not used: it is slow, and an
    ``Array`` whose ``object_id`` was computed caches ``memoryview`` chunks it cannot copy.
    """
    out = RecordDict()
    for key, record in records.items():
        if isinstance(record, ArrayRecord):
            copied: ArrayRecord | ConfigRecord | MetricRecord = ArrayRecord()
            for name, array in record.items():
                copied[name] = array
        elif isinstance(record, ConfigRecord | MetricRecord):
            copied = type(record)({k: list(v) if isinstance(v, list) else v
                                   for k, v in record.items()})
        else:
            copied = copy.deepcopy(record)
        out[key] = copied
    return out


def _record_state(record: ArrayRecord) -> dict[str, Any] | bytes:
    """An ArrayRecord for a checkpoint: its tensors (model weights: far faster than
    protobuf), else Flower's protobuf bytes."""
    from fedrac.wire.records import to_shared_state_dict

    try:
        return dict(to_shared_state_dict(record))  # read-only views: written, not copied
    except Exception:  # noqa: BLE001 - an Array that is no tensor: keep Flower's bytes
        return recorddict_to_proto(RecordDict({"r": record})).SerializeToString()


def _copy_context(context: Context) -> Context:
    """Working copy of a node context (committed back only if the ClientApp succeeds)."""
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=dict(context.node_config),
        state=_copy_recorddict(context.state),
        run_config=dict(context.run_config),
        series_id=context.series_id,
    )


def _reply_problem(reply: Any, ins: Message) -> str | None:
    """Why ``reply`` is not a valid reply to ``ins`` (``None`` if it is)."""
    if not isinstance(reply, Message):
        return f"ClientApp returned {type(reply).__name__}, expected a reply Message"
    meta, ins_meta = reply.metadata, ins.metadata
    if meta.reply_to_message_id != ins_meta.message_id:
        return "ClientApp returned a Message that is not a reply to the received Message"
    if (meta.src_node_id, meta.dst_node_id) != (ins_meta.dst_node_id, ins_meta.src_node_id):
        return "ClientApp reply has wrong source/destination node ids"
    return None


class InlineGrid(Grid):
    """A ``Grid`` whose ``push_messages`` runs the ``ClientApp`` in the calling process.

    Node ids are drawn from ``random.Random(seed)`` (never 0 or the SuperLink's id) and node
    ``i`` gets ``node_config = {"partition-id": i, "num-partitions": num_supernodes}`` updated
    with ``node_configs[i]``. A node's ``Context`` (with its persistent ``state``) is created
    on the first message it receives; its ``run_config`` is the run's ``override_config``.
    ``batch_train``: a handler that answers a round's train messages together (``None`` for
    each it leaves to the ClientApp), with working copies of their nodes' contexts.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_supernodes: int,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        *,
        seed: int = 0,
        batch_train: Callable[[list[tuple[Message, Context]]], list[Message | None]]
        | None = None,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if node_configs is not None and len(node_configs) != num_supernodes:
            raise ValueError(
                f"node_configs has {len(node_configs)} entries for {num_supernodes} nodes"
            )
        self._client_app = client_app
        self._batch_train = batch_train
        self._num_nodes = num_supernodes
        self._node_configs = node_configs
        self._rng = random.Random(seed)
        self._node_ids = self._draw_ids(num_supernodes, exclude={0, SUPERLINK_NODE_ID})
        self._partition = {node_id: i for i, node_id in enumerate(self._node_ids)}
        self._contexts: dict[int, Context] = {}
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None
        self._lock = threading.Lock()
        self._create_message_warned = False

    def _draw_ids(self, count: int, exclude: set[int]) -> list[int]:
        ids: list[int] = []
        taken = set(exclude)
        while len(ids) < count:
            candidate = self._rng.getrandbits(_ID_BITS)
            if candidate not in taken:
                taken.add(candidate)
                ids.append(candidate)
        return ids

    def _new_message_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def set_run(self, run: Run) -> None:
        """Set the run; node contexts from a previous run are dropped."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        if self._run is not None and self._run.run_id != run.run_id:
            self._contexts.clear()
            self._replies.clear()
        self._run = run

    @property
    def run(self) -> Run:
        """A copy of the run this grid operates in."""
        if self._run is None:
            raise RuntimeError("InlineGrid.set_run() has not been called")
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction message (deprecated in Flower: use ``Message(...)``)."""
        if not self._create_message_warned:
            self._create_message_warned = True
            log.warning("Grid.create_message is deprecated in Flower; use Message(...)")
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Ids of all nodes, in partition order."""
        return list(self._node_ids)

    def node_context(self, node_id: int) -> Context | None:
        """The persisted ``Context`` of ``node_id`` (``None`` before its first message)."""
        return self._contexts.get(node_id)

    def state_dict(self) -> dict[str, Any]:
        """The grid's id stream and every node's persisted ``Context.state`` (Flower's
        protobuf bytes), for a checkpoint: a resumed run continues with the same node state.
        ArrayRecords that nodes share (the same Arrays: delta-sync caches at one version) are
        stored once, in ``shared``, and named per node in ``refs``."""
        shared: dict[str, Any] = {}
        seen: dict[tuple, str] = {}
        contexts: dict[str, bytes] = {}
        refs: dict[str, dict[str, str]] = {}
        for node, ctx in self._contexts.items():
            own, named = RecordDict(), {}
            for key, record in ctx.state.items():
                if isinstance(record, ArrayRecord) and len(record) > 0:
                    ident = tuple((k, id(a)) for k, a in record.items())
                    if ident not in seen:
                        seen[ident] = str(len(shared))
                        shared[seen[ident]] = _record_state(record)
                    named[key] = seen[ident]
                else:
                    own[key] = record
            contexts[str(node)] = recorddict_to_proto(own).SerializeToString()
            refs[str(node)] = named
        return {"rng": self._rng.getstate(), "contexts": contexts, "shared": shared,
                "refs": refs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (call after :meth:`set_run`, before any message)."""
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        run = self.run
        self._contexts.clear()
        def parse(blob: bytes) -> RecordDict:
            proto = ProtoRecordDict()
            proto.ParseFromString(blob)
            return recorddict_from_proto(proto)

        from fedrac.wire.records import to_array_record

        shared = {ref: parse(value)["r"] if isinstance(value, bytes) else
                  to_array_record(value) for ref, value in (state.get("shared") or {}).items()}
        for node, blob in state["contexts"].items():
            context = self._node_context(int(node), run)
            context.state = parse(blob)
            for key, ref in (state.get("refs") or {}).get(node, {}).items():
                context.state[key] = ArrayRecord()  # a container of its own, shared Arrays
                for name, array in shared[ref].items():
                    context.state[key][name] = array

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run the ClientApp for each valid message now; return the accepted message ids.

        Like the SuperLink, an invalid message (wrong run, unknown destination, expired, ...)
        is logged and dropped: its id is not returned. With a ``batch_train`` handler the
        valid train messages go to it together first; what it does not answer goes to the
        ClientApp one by one. Ids are drawn in the same order either way.
        """
        run = self.run
        accepted: list[tuple[Message, int, str]] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = self._new_message_id()
            errors = validate_message(msg, is_reply_message=False)
            if msg.metadata.run_id != run.run_id:
                errors.append(f"run_id {msg.metadata.run_id} is not {run.run_id}")
            if msg.metadata.dst_node_id not in self._partition:
                errors.append(f"unknown destination node {msg.metadata.dst_node_id}")
            if not msg.has_content():
                errors.append("an instruction message must carry content")
            if errors:
                log.error(
                    "Dropping invalid message to node %s: %s",
                    msg.metadata.dst_node_id,
                    "; ".join(errors),
                )
                continue
            task_id = self._rng.getrandbits(_ID_BITS)
            accepted.append((msg, task_id, self._new_message_id()))
        with self._lock:
            batched = self._handle_batch([m for m, _, _ in accepted], run)
            for msg, task_id, reply_id in accepted:
                reply = batched.get(msg.metadata.message_id)
                if reply is None:
                    reply = self._handle(msg, run, task_id)
                reply.metadata.__dict__["_message_id"] = reply_id
                self._replies[msg.metadata.message_id] = reply
        return [msg.metadata.message_id for msg, _, _ in accepted]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Return (once) the available replies to ``message_ids``, in push order."""
        wanted = set(message_ids)
        ready = [mid for mid in self._replies if mid in wanted]
        return [self._replies.pop(mid) for mid in ready]

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> list[Message]:
        """Push ``messages`` and return all replies; ``timeout`` is accepted but never hit."""
        return self.pull_messages(self.push_messages(messages))

    def _node_context(self, node_id: int, run: Run) -> Context:
        context = self._contexts.get(node_id)
        if context is None:
            partition_id = self._partition[node_id]
            node_config: dict[str, Any] = {
                PARTITION_ID_KEY: partition_id,
                NUM_PARTITIONS_KEY: self._num_nodes,
            }
            if self._node_configs is not None:
                node_config.update(self._node_configs[partition_id])
            context = Context(
                run_id=run.run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run.override_config),
            )
            self._contexts[node_id] = context
        return context

    def _handle_batch(self, messages: list[Message], run: Run) -> dict[str, Message]:
        """Replies of the batch handler to the train messages among ``messages``, by message
        id (those it leaves out go to the ClientApp). Any exception of the handler sends
        them all to the ClientApp, which answers each as it would have."""
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if self._batch_train is None or len(train) < 2:
            return {}
        contexts = [_copy_context(self._node_context(m.metadata.dst_node_id, run))
                    for m in train]
        received = [make_message(metadata=copy.copy(m.metadata),
                                 content=_copy_recorddict(m.content)) for m in train]
        try:
            replies = self._batch_train(list(zip(received, contexts, strict=True)))
        except Exception as ex:  # the ClientApp path reports the error per message
            log.warning("engine.batched: the batch failed (%s: %s); these clients train one "
                        "by one", type(ex).__name__, ex)
            return {}
        from clients.handlers import bind_reply

        replies = [r if r is None else bind_reply(m, r) for m, r in zip(received, replies,
                                                                         strict=True)]
        out: dict[str, Message] = {}
        for msg, context, reply in zip(train, contexts, replies, strict=True):
            if reply is None or _reply_problem(reply, msg) is not None:
                continue
            self._contexts[msg.metadata.dst_node_id] = context
            out[msg.metadata.message_id] = make_message(
                metadata=reply.metadata, content=_copy_recorddict(reply.content))
        return out

    def _handle(self, msg: Message, run: Run, task_id: int) -> Message:
        """Call the ClientApp for ``msg``; an exception becomes an error reply."""
        node_id = msg.metadata.dst_node_id
        stored = self._node_context(node_id, run)
        context = _copy_context(stored)
        received = make_message(
            metadata=copy.copy(msg.metadata), content=_copy_recorddict(msg.content)
        )
        try:
            with _as_task(run.run_id, node_id, task_id):
                reply = self._client_app(message=received, context=context)
            if (problem := _reply_problem(reply, msg)) is not None:
                raise TypeError(problem)
        except Exception as ex:  # any ClientApp failure becomes an error reply, as in Flower
            log.error(
                "ClientApp raised on node %d (partition %d)",
                node_id,
                self._partition[node_id],
                exc_info=ex,
            )
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>")
            return Message(error, reply_to=msg)
        if context.run_config != stored.run_config:
            reason = (
                "The `run_config` field of the `Context` object cannot be modified "
                f"(run_id: {run.run_id})."
            )
            log.error("ClientApp on node %d: %s", node_id, reason)
            return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=msg)
        self._contexts[node_id] = context
        if reply.has_content():
            return make_message(metadata=reply.metadata, content=_copy_recorddict(reply.content))
        return reply


def _new_run(seed: int, run_config: Mapping[str, Any]) -> Run:
    """A ``Run`` with ids derived from ``seed`` (independent of the grid's id stream)."""
    rng = random.Random(f"fedrac-inline-run-{seed}")
    run = Run.create_empty(run_id=rng.getrandbits(_ID_BITS) or 1)
    run.primary_task_id = rng.getrandbits(_ID_BITS) or 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    return run


def set_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for this process (``None`` keeps torch's default).

    Client models in a simulation are small: on a busy 2-core machine two intra-op threads
    made a 64-wide MLP step 10-80x slower than one (docs/design-notes.md, section 2).
    """
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))


def run_inline(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    run_config: dict[str, Any] | None = None,
    node_configs: list[dict[str, Any]] | None = None,
    *,
    seed: int = 0,
    batch_train: Callable[[list[tuple[Message, Context]]], list[Message | None]]
    | None = None,
) -> InlineGrid:
    """Run ``server_app`` against ``num_supernodes`` in-process nodes running ``client_app``.

    The ServerApp is called as Flower's runtime calls it, ``server_app(grid=..., context=...)``,
    with a server ``Context`` (SuperLink node id, empty node config and state, ``run_config``).
    ``run_config`` is also every node's ``Context.run_config``; ``node_configs[i]`` is merged
    into node ``i``'s node config. Exceptions from the ServerApp propagate unchanged.
    ``batch_train`` (e.g. :func:`clients.batched.batch_trainer`) gets each round's train
    messages together (``engine.batched=true``).
    Returns the grid, whose ``node_context`` shows each node's final state.
    """
    config = dict(run_config or {})
    run = _new_run(seed, config)
    grid = InlineGrid(client_app, num_supernodes, node_configs, seed=seed,
                      batch_train=batch_train)
    grid.set_run(run)
    context = Context(
        run_id=run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(config),
    )
    with _as_task(run.run_id, SUPERLINK_NODE_ID, run.primary_task_id or 1):
        server_app(grid=grid, context=context)
    return grid
