"""Adapter-sized downloads on ``model=hf``: a node that holds the base receives what changed.

A tiny BERT classifier with its new head (trained in full beside the adapters) under the
inline engine with fedrac's real ClientApp: every adapter method gives the same trajectory,
bit for bit, with ``strategy.download=delta`` (the default on ``model=hf``) as with
``full``, and from the second round on a round's download costs at most 3x its upload.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from tests import hf_models as H

pytest.importorskip("transformers")

ADAPTER_METHODS = ("rac_lora", "ffa_lora", "fedit", "cola", "flora", "fedex_lora")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("downloads")
    return {"bert": H.build_checkpoint(root / "bert", "bert"),
            "data": H.write_csv(root / "sentiment.csv", H.sentiment_rows(120))}


def compose(ckpt, tmp, *extra: str) -> dict:
    from bench.common import compose_cfg

    return compose_cfg(
        "model=hf", f"model.path={ckpt['bert']}", "dataset=files",
        f"dataset.path={ckpt['data']}", "dataset.text_column=text", "dataset.max_length=16",
        "num_clients=4", "client.local_steps=2", "client.lr=0.01", "strategy.rank=2",
        f"output_dir={tmp}", f"cache_dir={tmp / 'cache'}", *extra)


def run_rounds(cfg: dict, rounds: int):
    """The global weights after every round (and before the first) and the strategy."""
    from clients.client_app import make_client_app
    from clients.handlers import client_model, module_keys
    from fedrac.adapters import find_target_layers
    from fedrac.engines.inline import run_inline
    from fedrac.models.pretrain import pretrained_state
    from fedrac.settings.typed import settings_of
    from strategies import build_strategy

    cfg = {**cfg, "num_rounds": rounds}
    settings = settings_of(cfg)
    model = client_model(settings)
    state = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"], cfg["cache_dir"])
    model.load_state_dict(state)
    strategy = build_strategy(settings, find_target_layers(model, settings.model.target_modules))
    strategy.set_trainable_modules({k: tuple(p.shape)
                                    for k, p in module_keys(model, settings.model).items()})
    assert strategy.module_shapes  # the new classifier head is trained in full
    seen: list[dict[str, torch.Tensor]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def evaluate_fn(rnd: int, arrays: ArrayRecord) -> None:
            seen.append(arrays.to_torch_state_dict())

        strategy.start(grid, ArrayRecord(state), num_rounds=rounds, evaluate_fn=evaluate_fn)

    strategy.grid = run_inline(server, make_client_app(settings), int(cfg["num_clients"]))
    return seen, strategy


def kinds(strategy, direction: str, rounds) -> dict[str, int]:
    out: dict[str, int] = {}
    for rnd in rounds:
        for kind, n in strategy.ledger.round_kinds(rnd, direction).items():
            out[kind] = out.get(kind, 0) + n
    return out


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_delta_downloads_are_bit_identical_to_full_ones(ckpt, tmp_path, method):
    """Partial participation: nodes come back several rounds behind and replay the changes
    (factors and seeds, merged products, residuals, the head's new values) on their cache."""
    extra = (f"strategy={method}", "strategy.rank=2", "fraction_train=0.5")
    full, s_full = run_rounds(compose(ckpt, tmp_path, *extra, "strategy.download=full"), 4)
    delta, s_delta = run_rounds(compose(ckpt, tmp_path, *extra), 4)  # auto: delta on hf
    assert s_full.sync is None and s_delta.sync is not None
    assert len(full) == len(delta) == 5
    for rnd, (a, b) in enumerate(zip(full, delta, strict=True)):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), (method, rnd)
    head = [k for k in full[-1] if k.startswith("classifier")]
    assert head and not torch.equal(full[0][head[0]], full[-1][head[0]])  # the head trained
    # one full download per node, at its first contact: no node had to resync
    per_node = s_delta.ledger.round_kinds(1, "down")["weights"] // 2  # 2 nodes in round 1
    assert kinds(s_delta, "down", range(1, 5))["weights"] == \
        per_node * len(s_delta.sync.node_version)
    later = range(2, 5)
    assert kinds(s_delta, "down", later).get("deltas", 0) > 0
    assert sum(kinds(s_delta, "down", later).values()) < \
        sum(kinds(s_full, "down", later).values()) / 2


def test_rac_lora_downloads_at_most_three_times_the_upload(ckpt, tmp_path):
    """The issue's target: BERT classifier with its head, rac_lora, 6 rounds."""
    _, strategy = run_rounds(compose(ckpt, tmp_path, "strategy=rac_lora"), 6)
    assert strategy.ledger.round_kinds(1, "down").get("weights", 0) > 0  # first contact
    for rnd in range(2, 7):
        down, up = (strategy.ledger.round_total(rnd, d) for d in ("down", "up"))
        assert strategy.ledger.round_kinds(rnd, "down").get("weights", 0) == 0
        assert down <= 3 * up, (rnd, down, up)
    # the 4 nodes hold one version: one copy of its weights, in memory and in a checkpoint
    from fedrac.wire.delta_sync import STATE_WEIGHTS

    grid = strategy.grid
    caches = [grid.node_context(n).state[STATE_WEIGHTS] for n in grid.get_node_ids()]
    assert len(caches) == 4 and len({id(a) for c in caches for a in c.values()}) == \
        len(caches[0])
    state = grid.state_dict()
    assert len(state["shared"]) == 1 and all(len(r) == 1 for r in state["refs"].values())


def test_auto_download_is_delta_on_hf_only():
    from strategies.delta_sync import resolve_download
    from tests.helpers import settings_with

    def cfg(model: str, download: str = "auto", secagg: str = "none"):
        return settings_with(model={"name": model, "target_modules": ["all"]},
                             strategy={"name": "rac_lora", "download": download},
                             secagg={"name": secagg})

    assert resolve_download(cfg("hf")) == "delta"
    assert resolve_download(cfg("mlp")) == "full"
    assert resolve_download(cfg("hf", secagg="plus")) == "full"
    assert resolve_download(cfg("hf", "full")) == "full"
    assert resolve_download(cfg("mlp", "delta")) == "delta"


@pytest.mark.parametrize("d_in", [64, 4])
def test_fedex_residual_is_sent_low_rank_where_it_is(d_in):
    """Linear rule: the stacked factors' product is the dense residual ``sum_k p_k s B_k A_k
    - s B A`` (wide layer: K+1 stacked rank-r pairs are smaller than the weight); a narrow
    layer gets the dense residual."""
    from flwr.app import MetricRecord

    from fedrac.adapters import LayerSpec
    from fedrac.wire.delta_sync import apply_update
    from strategies.base import ValidReply
    from strategies.fedex_lora import FedExLoRA

    layers = {"fc": LayerSpec("fc", (48, d_in))}
    s = FedExLoRA(layers=layers, rank=2, alpha=3.0, run_seed=0)
    g = torch.Generator().manual_seed(0)
    valid = [ValidReply(i, {"fc.lora_A": torch.randn(2, d_in, generator=g),
                            "fc.lora_B": torch.randn(48, 2, generator=g)}, w, MetricRecord())
             for i, w in enumerate((1.0, 3.0, 4.0))]
    s.adapters = {k: sum(r.tensors[k] * (r.weight / 8) for r in valid) for k in valid[0].tensors}
    record = s.low_rank_residual(valid)
    a64 = {k: v.to(torch.float64) for k, v in s.adapters.items()}
    dense = sum((r.weight / 8) * 1.5 * r.tensors["fc.lora_B"].double() @
                r.tensors["fc.lora_A"].double() for r in valid) - \
        1.5 * a64["fc.lora_B"] @ a64["fc.lora_A"]
    if d_in == 64:
        assert set(record) == {"fc.stack_B", "fc.stack_A"}
        assert record["fc.stack_A"].shape == (8, d_in)  # (K+1) r
    else:
        assert set(record) == {"fc.weight"}
    got = apply_update({"fc.weight": torch.zeros(48, d_in, dtype=torch.float64)}, record, layers)
    assert torch.allclose(got["fc.weight"], dense, atol=1e-5, rtol=1e-5)
    assert dense.abs().max() > 1e-2  # the residual is not trivially zero


def test_deployment_worker_holds_the_cached_weights_and_the_context_a_token():
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedrac.deploy import worker
    from fedrac.wire.delta_sync import STATE_SYNC, STATE_WEIGHTS

    weights = ArrayRecord({"w": torch.ones(3)})
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(
        {STATE_WEIGHTS: weights, STATE_SYNC: ConfigRecord({"version": 2})}), run_config={})
    worker.hold(7, ctx)
    assert STATE_WEIGHTS not in ctx.state and worker.HELD_KEY in ctx.state  # a token travels
    worker.restore_held(7, ctx)
    assert ctx.state[STATE_WEIGHTS] is weights and worker.HELD_KEY not in ctx.state
    worker.hold(7, ctx)
    worker._held.clear()  # a worker started again holds nothing: the node resyncs
    worker.restore_held(7, ctx)
    assert STATE_WEIGHTS not in ctx.state
