"""Tests for the in-process Flower engine ``fedrac.engines.inline``.

The apps below keep their logic in module-level functions: under Ray (the ``slow`` test)
the ClientApp is pickled into worker processes, which then import this module by name.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedrac.engines.inline import InlineGrid, _as_task, run_inline

NUM_NODES = 4
WEIGHTS = (1, 1, 2, 4)  # num-examples of partition i; power-of-two weights keep FedAvg exact
FAILING_PARTITION = 3
INITIAL = (np.array([0.0, 1.0, -2.0]), np.array([[0.5, 4.0]]))

OBSERVED: list[dict[str, Any]] = []  # one entry per in-process ClientApp call
RESULTS: dict[str, Any] = {}  # written by the ServerApp main


def _identity() -> tuple[int | None, int | None]:
    """``(run_id, node_id)`` of Flower's process-wide TaskIdentity; ``None`` where unset."""
    try:
        return TaskIdentity.run_id, TaskIdentity.node_id
    except RuntimeError:
        return None, None


def _bump(context: Context, key: str) -> int:
    """Increment counter ``key`` kept in the node's persistent ``context.state``."""
    counters = context.state.config_records.get("counters", ConfigRecord())
    counters[key] = int(counters.get(key, 0)) + 1
    context.state["counters"] = counters
    return int(counters[key])


def _count(context: Context, key: str) -> int:
    return int(context.state.config_records.get("counters", ConfigRecord()).get(key, 0))


def _observe(kind: str, msg: Message, context: Context, **extra: Any) -> None:
    OBSERVED.append(
        {
            "kind": kind,
            "partition": int(context.node_config["partition-id"]),
            "node_id": context.node_id,
            "run_id": context.run_id,
            "identity": _identity(),
            "message_id": msg.metadata.message_id,
            "round": int(msg.content["config"]["server-round"]),
            "node_config": dict(context.node_config),
            "run_config": dict(context.run_config),
            **extra,
        }
    )


def _train_reply(msg: Message, context: Context) -> Message:
    """Add the partition id to every array; weight the update by ``WEIGHTS``."""
    pid = int(context.node_config["partition-id"])
    calls = _bump(context, "train")
    _observe("train", msg, context, calls=calls)
    arrays = [a + pid for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": WEIGHTS[pid % len(WEIGHTS)], "train-calls": calls})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


def _evaluate_reply(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    calls = _bump(context, "evaluate")
    _observe("evaluate", msg, context, calls=calls, train_calls=_count(context, "train"))
    metrics = MetricRecord({"num-examples": WEIGHTS[pid % len(WEIGHTS)], "loss": float(pid)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _train_or_fail(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == FAILING_PARTITION:
        _bump(context, "train")  # must not persist: the call fails
        raise RuntimeError("boom from the failing partition")
    return _train_reply(msg, context)


client_app = ClientApp()
client_app.train()(_train_reply)
client_app.evaluate()(_evaluate_reply)

failing_client_app = ClientApp()
failing_client_app.train()(_train_or_fail)
failing_client_app.evaluate()(_evaluate_reply)


def make_server_app(
    num_nodes: int, num_rounds: int, key: str, fraction_train: float = 1.0
) -> ServerApp:
    """A ServerApp running FedAvg over ``INITIAL``; stores the final arrays in ``RESULTS``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Sample sizes are pinned: FedAvg sizes its sample from the nodes connected *before*
        # it waits for min_available_nodes, and Ray's nodes register after the ServerApp starts.
        strategy = FedAvg(
            fraction_train=fraction_train,
            min_train_nodes=max(1, int(num_nodes * fraction_train)),
            min_evaluate_nodes=num_nodes,
            min_available_nodes=num_nodes,
        )
        initial = ArrayRecord([a.copy() for a in INITIAL])
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds)
        RESULTS[key] = result.arrays.to_numpy_ndarrays()
        RESULTS[f"{key}-server-identity"] = _identity()
        RESULTS[f"{key}-server-context"] = context

    return app


def expected_arrays(num_rounds: int, partitions: range | list[int]) -> list[np.ndarray]:
    """``INITIAL`` plus, per round, the ``WEIGHTS``-weighted mean of the partition ids."""
    total = sum(WEIGHTS[p] for p in partitions)
    step = sum(WEIGHTS[p] * p for p in partitions) / total
    return [a + num_rounds * step for a in INITIAL]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    OBSERVED.clear()
    RESULTS.clear()
    yield
    OBSERVED.clear()
    RESULTS.clear()


@pytest.fixture
def flwr_log() -> Iterator[list[str]]:
    """Messages logged on the ``flwr`` logger during the test."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(level=logging.INFO)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def _assert_arrays_equal(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


def test_fedavg_result_is_exact_weighted_average() -> None:
    run_inline(make_server_app(NUM_NODES, 3, "inline"), client_app, NUM_NODES)
    _assert_arrays_equal(RESULTS["inline"], expected_arrays(3, range(NUM_NODES)))
    trains = [o for o in OBSERVED if o["kind"] == "train"]
    assert sorted(o["round"] for o in trains) == [r for r in (1, 2, 3) for _ in range(NUM_NODES)]
    assert {o["partition"] for o in trains} == set(range(NUM_NODES))


def test_node_state_persists_across_rounds() -> None:
    random.seed(1234)
    num_rounds = 6
    run_inline(
        make_server_app(NUM_NODES, num_rounds, "inline", fraction_train=0.5), client_app, NUM_NODES
    )
    by_node: dict[int, list[dict[str, Any]]] = {}
    for o in OBSERVED:
        by_node.setdefault(o["node_id"], []).append(o)
    assert len(by_node) == NUM_NODES
    sampled_twice = 0
    for entries in by_node.values():
        trains = [o for o in entries if o["kind"] == "train"]
        assert [o["calls"] for o in trains] == list(range(1, len(trains) + 1))
        sampled_twice += len(trains) >= 2
        evals = [o for o in entries if o["kind"] == "evaluate"]
        assert [o["calls"] for o in evals] == list(range(1, num_rounds + 1))
        # train and evaluate share the node's state: evaluation sees the train counter
        for ev in evals:
            assert ev["train_calls"] == sum(t["round"] <= ev["round"] for t in trains)
    assert sampled_twice > 0  # 6 rounds x 2 of 4 nodes: some node was sampled again


def test_clientapp_exception_becomes_error_reply(flwr_log: list[str]) -> None:
    num_rounds = 3
    run_inline(make_server_app(NUM_NODES, num_rounds, "inline"), failing_client_app, NUM_NODES)

    survivors = [p for p in range(NUM_NODES) if p != FAILING_PARTITION]
    _assert_arrays_equal(RESULTS["inline"], expected_arrays(num_rounds, survivors))
    failing_node = next(o["node_id"] for o in OBSERVED if o["partition"] == FAILING_PARTITION)
    errors = [m for m in flwr_log if f"Received error in reply from node {failing_node}" in m]
    assert len(errors) == num_rounds
    assert all("boom from the failing partition" in m for m in errors)
    assert sum("Received 3 results and 1 failures" in m for m in flwr_log) == num_rounds
    # The failed call's state change was discarded, as Flower's runtime does.
    evals = [o for o in OBSERVED if o["partition"] == FAILING_PARTITION]
    assert [o["train_calls"] for o in evals] == [0] * num_rounds


def test_task_identity_is_node_inside_clientapp_and_restored_after() -> None:
    with _as_task(run_id=111, node_id=222, task_id=333):
        run_inline(make_server_app(NUM_NODES, 2, "inline"), client_app, NUM_NODES)
        assert _identity() == (111, 222)
        assert TaskIdentity.task_id == 333
    server_context = RESULTS["inline-server-context"]
    assert server_context.node_id == SUPERLINK_NODE_ID
    assert RESULTS["inline-server-identity"] == (server_context.run_id, SUPERLINK_NODE_ID)
    assert OBSERVED
    for o in OBSERVED:
        assert o["run_id"] == server_context.run_id
        assert o["identity"] == (o["run_id"], o["node_id"])
    assert len({o["node_id"] for o in OBSERVED}) == NUM_NODES


def test_as_task_sets_and_restores_identity() -> None:
    with _as_task(run_id=1, node_id=2, task_id=3):
        with pytest.raises(KeyError):
            with _as_task(run_id=10, node_id=20, task_id=30):
                assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (
                    10,
                    20,
                    30,
                )
                raise KeyError("fail inside")
        assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (1, 2, 3)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = None, None, None
    try:
        with _as_task(run_id=5, node_id=6, task_id=7):
            assert _identity() == (5, 6)
        assert _identity() == (None, None)  # an unset identity is restored as unset
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def test_identical_results_when_run_twice() -> None:
    runs = []
    for _ in range(2):
        OBSERVED.clear()
        random.seed(99)
        run_inline(
            make_server_app(NUM_NODES, 4, "inline", fraction_train=0.5), client_app, NUM_NODES
        )
        keys = ("kind", "node_id", "run_id", "message_id", "round", "calls")
        runs.append((RESULTS["inline"], [tuple(o[k] for k in keys) for o in OBSERVED]))
    (arrays_a, calls_a), (arrays_b, calls_b) = runs
    _assert_arrays_equal(arrays_a, arrays_b)
    assert calls_a == calls_b


def test_configs_reach_contexts() -> None:
    node_configs = [{"client-name": f"c{i}"} for i in range(2)]
    run_inline(make_server_app(2, 1, "inline"), client_app, 2, {"lr": 0.5}, node_configs)
    assert RESULTS["inline-server-context"].run_config == {"lr": 0.5}
    seen = {o["partition"]: o for o in OBSERVED}
    assert set(seen) == {0, 1}
    for pid, o in seen.items():
        assert o["node_config"] == {
            "partition-id": pid,
            "num-partitions": 2,
            "client-name": f"c{pid}",
        }
        assert o["run_config"] == {"lr": 0.5}
    with pytest.raises(ValueError, match="node_configs"):
        run_inline(make_server_app(2, 1, "inline"), client_app, 3, node_configs=node_configs)


def test_serverapp_exception_propagates() -> None:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        raise ZeroDivisionError("server failed")

    with _as_task(run_id=7, node_id=8, task_id=9):
        with pytest.raises(ZeroDivisionError, match="server failed"):
            run_inline(app, client_app, 2)
        assert _identity() == (7, 8)


def _grid(app: ClientApp, num_nodes: int = NUM_NODES) -> tuple[InlineGrid, Run]:
    grid = InlineGrid(app, num_nodes, seed=5)
    run = Run.create_empty(run_id=4242)
    run.primary_task_id = 1
    grid.set_run(run)
    return grid, run


def _train_msg(node_id: int, value: float = 1.0) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord([np.full(2, value)]), "config": ConfigRecord({"server-round": 1})}
    )
    return Message(content, node_id, "train", group_id="round-1", ttl=600.0)


def test_grid_metadata_and_error_reply() -> None:
    grid, run = _grid(failing_client_app)
    node_ids = grid.get_node_ids()
    assert len(set(node_ids)) == NUM_NODES and SUPERLINK_NODE_ID not in node_ids
    assert node_ids == InlineGrid(client_app, NUM_NODES, seed=5).get_node_ids()
    with _as_task(run.run_id, SUPERLINK_NODE_ID, 1):
        msgs = [_train_msg(n) for n in node_ids]
        replies = grid.send_and_receive(msgs)
    assert [r.metadata.reply_to_message_id for r in replies] == [
        m.metadata.message_id for m in msgs
    ]
    assert len({m.metadata.message_id for m in [*msgs, *replies]}) == 2 * NUM_NODES
    for pid, (msg, reply) in enumerate(zip(msgs, replies, strict=True)):
        assert msg.metadata.src_node_id == SUPERLINK_NODE_ID
        assert msg.metadata.run_id == reply.metadata.run_id == run.run_id
        assert reply.metadata.src_node_id == node_ids[pid]
        assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
        assert reply.metadata.group_id == "round-1"
        assert reply.metadata.message_type == "train"
        assert 0 < reply.metadata.ttl <= 600.0
        assert reply.metadata.created_at >= msg.metadata.created_at
        assert reply.has_error() == (pid == FAILING_PARTITION)
    error = replies[FAILING_PARTITION].error
    assert error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom from the failing partition" in error.reason
    assert grid.pull_messages([m.metadata.message_id for m in msgs]) == []  # delivered once


def test_grid_drops_invalid_messages_and_isolates_content() -> None:
    mutating_app = ClientApp()

    @mutating_app.train()
    def train(msg: Message, context: Context) -> Message:
        msg.content["arrays"]["0"] = Array(np.zeros(2))
        msg.content["config"]["server-round"] = -1
        context.state["kept"] = msg.content["arrays"]
        return Message(msg.content, reply_to=msg)

    grid, run = _grid(mutating_app, num_nodes=2)
    with _as_task(run.run_id, SUPERLINK_NODE_ID, 1):
        sent = _train_msg(grid.get_node_ids()[0], value=3.0)
        _ = sent.content.object_id  # caches memoryview chunks, which deepcopy cannot copy
        unknown = _train_msg(999)
        ids = grid.push_messages([sent, unknown])
    assert ids == [sent.metadata.message_id]
    np.testing.assert_array_equal(sent.content["arrays"].to_numpy_ndarrays()[0], [3.0, 3.0])
    assert sent.content["config"]["server-round"] == 1
    (reply,) = grid.pull_messages(ids)
    reply.content["arrays"]["0"] = Array(np.ones(2))
    kept = grid.node_context(grid.get_node_ids()[0]).state["kept"]
    np.testing.assert_array_equal(kept.to_numpy_ndarrays()[0], [0.0, 0.0])


def test_thousand_nodes_are_cheap() -> None:
    num_nodes = 1000
    grid, run = _grid(client_app, num_nodes=num_nodes)
    node_ids = grid.get_node_ids()
    assert len(set(node_ids)) == num_nodes
    assert all(grid.node_context(n) is None for n in node_ids)  # contexts are created lazily
    with _as_task(run.run_id, SUPERLINK_NODE_ID, 1):
        replies = grid.send_and_receive([_train_msg(n) for n in node_ids[::100]])
    assert len(replies) == 10 and not any(r.has_error() for r in replies)
    assert sum(grid.node_context(n) is not None for n in node_ids) == 10
    run_inline(make_server_app(num_nodes, 1, "inline", fraction_train=0.05), client_app, num_nodes)
    assert len({o["node_id"] for o in OBSERVED if o["kind"] == "evaluate"}) == num_nodes


@pytest.mark.slow
def test_same_result_as_flower_simulation(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    num_rounds = 3
    # run_simulation sets Flower's process-wide task identity and leaves it set.
    with _as_task(run_id=0, node_id=0, task_id=0):
        run_simulation(
            server_app=make_server_app(NUM_NODES, num_rounds, "ray"),
            client_app=client_app,
            num_supernodes=NUM_NODES,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2},
            },
        )
    run_inline(make_server_app(NUM_NODES, num_rounds, "inline"), client_app, NUM_NODES)
    _assert_arrays_equal(RESULTS["ray"], RESULTS["inline"])
    _assert_arrays_equal(RESULTS["inline"], expected_arrays(num_rounds, range(NUM_NODES)))
