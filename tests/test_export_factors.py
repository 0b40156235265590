"""adapter/ from the run's merged factors: the record equals W - W0 for every adapter method,
compression and truncation are exact, auto ranks are the smallest exact ones, and PEFT loads
the adapter onto W0 as the final weights."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from fedrac.adapters import LayerSpec, find_target_layers
from fedrac.models.export import adapter_factors_of, low_rank
from fedrac.models.merged_factors import MergedFactors
from fedrac.server.checkpoint import load_checkpoint, save_checkpoint
from tests import hf_models as H
from tests.helpers import run_strategy, settings_with
from tests.test_baselines import LAYERS, NODES, Clients, _initial, _strategy


def _logical(spec: LayerSpec, w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return w.T if spec.transposed else w.reshape(spec.d_out, spec.d_in)


def _terms(spec: LayerSpec, count: int, rank: int, seed: int, size: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    return [(size * torch.randn(spec.d_out, rank, generator=gen, dtype=torch.float64),
             torch.randn(rank, spec.d_in, generator=gen, dtype=torch.float64))
            for _ in range(count)]


@pytest.mark.parametrize(("name", "kw"), [
    ("rac_lora", {"train_factor": "B"}), ("rac_lora", {"train_factor": "alternate"}),
    ("ffa_lora", {"train_factor": "B"}), ("fedit", {}), ("cola", {"merge_every": 2}),
    ("flora", {}), ("fedex_lora", {"train_factor": "A"})])
def test_the_record_is_w_minus_w0_for_every_adapter_method(name, kw, tmp_path):
    """Four rounds of four fake clients; the layers are small, so the stacks are compressed
    (rank budget 2 for 7x5) on the way: still exact."""
    clients = Clients(sides=None)

    def train(msg, context):
        side = msg.content["config"]["train-factor"]
        clients.sides = ("A", "B") if side == "both" else (side,)
        return clients(msg, context)

    strategy = _strategy(name, **kw)
    seen = run_strategy(strategy, ArrayRecord(_initial()), 4, NODES, train)
    final, initial = seen[-1].to_torch_state_dict(), _initial()
    merged = strategy.export_factors()
    assert merged is not None and merged.usable
    for n, spec in LAYERS.items():
        b, a = merged.stacks(n)
        assert b.shape[1] <= 2 * min(spec.d_out, spec.d_in)  # compressed, not 4 x 4 x rank
        delta = _logical(spec, final[spec.weight_key]) - _logical(spec, initial[spec.weight_key])
        assert delta.norm() > 0.5
        torch.testing.assert_close(b.double() @ a.double(), delta, rtol=0, atol=2e-5)
    save_checkpoint(tmp_path, {"strategy": strategy.state_dict()})  # a checkpoint keeps it
    again = _strategy(name, **kw)
    again.load_state_dict(load_checkpoint(tmp_path)["strategy"])
    for n in LAYERS:
        for got, want in zip(again.export_factors().stacks(n), merged.stacks(n), strict=True):
            assert torch.equal(got, want)


def test_a_dense_merge_or_an_old_checkpoint_leaves_no_record():
    strategy = _strategy("rac_lora")
    state = strategy.state_dict()
    del state["merged"]  # a checkpoint written before the record existed
    strategy.load_state_dict(state)
    assert strategy.export_factors() is None
    fedex = _strategy("fedex_lora")
    fedex.base = _initial()
    fedex.merge_into_base({s.weight_key: torch.zeros(s.weight_shape)
                           for s in LAYERS.values()}, as_update=True)  # a dense update
    assert fedex.export_factors() is None


def test_compression_is_exact_and_bounded():
    spec = LayerSpec("w", (40, 30))
    merged = MergedFactors({"w": spec})
    total = torch.zeros(40, 30, dtype=torch.float64)
    for b, a in _terms(spec, 25, 2, seed=1):
        merged.add("w", b, a)
        total += b @ a
        assert merged.rank("w") <= 2 * 30
    assert merged.compact["w"] == 30  # compressed to the numerical rank, min(d_out, d_in)
    b, a = merged.stacks("w")
    torch.testing.assert_close(b.double() @ a.double(), total, rtol=0, atol=1e-6)


def test_auto_rank_is_the_exact_rank_and_truncation_the_dense_best():
    layers = {"wide": LayerSpec("wide", (24, 64)), "narrow": LayerSpec("narrow", (6, 40)),
              "conv": LayerSpec("conv", (16, 3, 3, 3)), "gpt": LayerSpec("gpt", (20, 36), True)}
    merged = MergedFactors(layers)
    dense = {}
    for i, (n, spec) in enumerate(layers.items()):
        dense[n] = torch.zeros(spec.d_out, spec.d_in, dtype=torch.float64)
        for b, a in _terms(spec, 3, 2, seed=10 + i):
            merged.add(n, b, a)
            dense[n] += b @ a
    factors, rel, worst = adapter_factors_of(layers, {}, {}, "auto", merged)
    ranks = {n: int(a.shape[0]) for n, (a, _) in factors.items()}
    assert ranks == {"wide": 6, "narrow": 6, "conv": 6, "gpt": 6}
    assert rel < 1e-6 and worst < 1e-6
    for n, (a, b) in factors.items():
        torch.testing.assert_close(b.double() @ a.double(), dense[n], rtol=0, atol=1e-5)
    cut, rel3, _ = adapter_factors_of(layers, {}, {}, 3, merged)
    err2 = norm2 = 0.0
    for n, (a, b) in cut.items():
        da, db, err, norm = low_rank(dense[n], 3)
        torch.testing.assert_close(b.double() @ a.double(), db @ da, rtol=0, atol=1e-5)
        err2, norm2 = err2 + err ** 2, norm2 + norm ** 2
    assert rel3 == pytest.approx((err2 / norm2) ** 0.5, rel=1e-5) and rel3 > 0.1


def test_the_factor_export_is_the_dense_one_without_its_cost():
    """The same adapter from the record as from the dense W - W0 (the old path)."""
    spec = LayerSpec("w", (48, 32))
    layers = {"w": spec}
    merged = MergedFactors(layers)
    w0 = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    w = w0.double()
    for b, a in _terms(spec, 4, 3, seed=4):
        merged.add("w", b, a)
        w = (w + b @ a).float().double()  # the server rounds after every merge
    initial, final = {"w.weight": w0}, {"w.weight": w.float()}
    fast, _, _ = adapter_factors_of(layers, initial, final, "auto", merged)
    slow, _, _ = adapter_factors_of(layers, initial, final, "auto", None)
    assert fast["w"][0].shape[0] == slow["w"][0].shape[0] == 12
    torch.testing.assert_close(fast["w"][1].double() @ fast["w"][0].double(),
                               slow["w"][1].double() @ slow["w"][0].double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_the_auto_rank_adapter_onto_w0_as_the_final_weights(arch, tmp_path, capsys):
    """Per-layer ranks (rank_pattern) of a chain of rank-2 merges, all seven LLaMA projections
    (GPT-2: Conv1D, stored transposed); PEFT's merged model equals the final weights."""
    from peft import PeftModel

    from fedrac.models.export import export_transformers
    from fedrac.models.hf import build_hf_model

    vocab = {"<s>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(30)}}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if arch == "llama" else ["c_attn", "c_proj", "c_fc"]
    model_cfg = {"name": "hf", "config": H.model_config(arch, vocab), "task": "causal_lm",
                 "trainable_modules": "auto", "export_rank": "auto"}
    model = build_hf_model(model_cfg, 0)
    layers = find_target_layers(model, targets)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    final = dict(initial)
    merged = MergedFactors(layers)
    for i, (n, spec) in enumerate(sorted(layers.items())):
        for b, a in _terms(spec, 1 + i % 4, 2, seed=i):  # 2..8 rank per layer
            merged.add(n, b, a)
            w = final[spec.weight_key]
            final[spec.weight_key] = (w.double() + spec.delta(a, b, 1.0)).float()
    settings = settings_with(model={**model_cfg, "target_modules": targets},
                             strategy={"name": "rac_lora", "rank": 2})
    result = export_transformers(settings, model, layers, initial, final, tmp_path, merged)
    assert result["adapter_from_factors"] and result["adapter_relative_error"] < 1e-6
    assert set(result["adapter_ranks"].values()) == {2, 4, 6, 8}
    assert "rank auto: 2..8 per layer" in capsys.readouterr().out
    base = build_hf_model(model_cfg, 0)
    assert all(torch.equal(v, initial[k]) for k, v in base.state_dict().items())
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    got = loaded.state_dict()
    for spec in layers.values():
        w, w0 = final[spec.weight_key], initial[spec.weight_key]
        gap = (got[spec.weight_key] - w).norm()
        assert gap < 1e-5 * w.norm() and gap < 1e-4 * (w - w0).norm(), spec.name


def test_a_record_that_misses_a_merge_is_not_used():
    """The export probes the record against W - W0; one merge too few is noticed (a run
    stopped between the merge and its weights), so adapter/ never disagrees with hf_model/."""
    from fedrac.models.export import matches_weights

    layers = {"w": LayerSpec("w", (48, 32)), "t": LayerSpec("t", (32, 40), True)}
    merged = MergedFactors(layers)
    initial = {s.weight_key: torch.randn(*s.weight_shape,
                                         generator=torch.Generator().manual_seed(1))
               for s in layers.values()}
    final = dict(initial)
    for i, (n, spec) in enumerate(layers.items()):
        for j, (b, a) in enumerate(_terms(spec, 4, 2, seed=20 + i, size=0.01)):
            if j < 3 or n == "w":
                merged.add(n, b, a)
            final[spec.weight_key] = (final[spec.weight_key].double()
                                      + spec.delta(a, b, 1.0)).float()
    assert "layer 't' differs from W - W0" in matches_weights(merged, layers, initial, final)
    merged.add("t", *_terms(layers["t"], 4, 2, seed=21, size=0.01)[3])
    assert matches_weights(merged, layers, initial, final) is None


def test_the_export_benchmark_runs_on_the_workload_shapes():
    """``python -m bench.export --quick``'s figures: 28 layers, exact rank 8 after 1 round."""
    from bench.export import export_times

    row = export_times(1, 0)  # the dense SVDs are the slow part: python -m bench.export
    assert row["layers"] == 28 and row["ranks"] == [8] and row["relative_error"] < 1e-6
    assert row["factor_seconds"] > 0
