"""strategy=fed_sb: LoRA-SB's initialisation, the exact average of R, r² upload, bad input."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from torch import nn

from clients.fed_sb import STATE_FRAME, init_upload, with_frame
from clients.handlers import global_state, prepare_adapters
from fedrac.adapters import (
    LayerSpec,
    adapter_factors,
    attach_adapters,
    effective_weights,
    find_target_layers,
    remove_adapters,
)
from fedrac.adapters.sketch import fingerprint
from fedrac.settings.config import ConfigError
from fedrac.training.local import layer_gradients, resolve_device
from strategies.fed_sb import FedSB, lora_sb_init
from tests.helpers import client_settings, reply, run_config, run_strategy

LAYERS = {"rect": LayerSpec("rect", (7, 5)), "sq": LayerSpec("sq", (6, 6))}
RANK, ALPHA, SEED, NODES, STEP = 2, 3.0, 5, 4, 0.01
SCALE = ALPHA / RANK


def _initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{n}.weight": torch.randn(*s.weight_shape, generator=gen) for n, s in LAYERS.items()}


def _random(seed: int, shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _model() -> nn.Module:
    model = nn.Module()
    for name, spec in LAYERS.items():
        setattr(model, name, nn.Linear(spec.d_in, spec.d_out, bias=False))
    return model


class Clients:
    """Fake clients: a seeded gradient when asked, else a random ``R_k``; weights
    ``(pid + 1) * 3``; each one's local model is kept."""

    def __init__(self):
        self.local, self.messages, self.gradients = {}, [], {}

    def weight(self, pid: int) -> int:
        return (pid + 1) * 3

    def __call__(self, msg, context):
        pid = int(context.node_config["partition-id"])
        config = msg.content["config"]
        rnd = int(config["server-round"])
        self.messages.append((rnd, pid, msg))
        if config["mode"] == "gradient":
            grads = {f"{n}.weight": _random(pid + 77, (s.d_out, s.d_in))
                     for n, s in LAYERS.items()}
            self.gradients[pid] = grads
            return reply(msg, "gradient", init_upload(grads, config), self.weight(pid))
        start = global_state(msg.content)
        model = _model()
        prepare_adapters(model, find_target_layers(model, list(LAYERS)),
                         with_frame(msg.content, context), rnd)
        frame = adapter_factors(model, trained_only=False)
        remove_adapters(model)
        rs = {f"{n}.lora_R": _random(1000 * rnd + pid, (RANK, RANK)) for n in LAYERS}
        self.local[(rnd, pid)] = {
            f"{n}.weight": start[f"{n}.weight"].double() + SCALE * (
                frame[f"{n}.lora_B"].double() @ rs[f"{n}.lora_R"].double()
                @ frame[f"{n}.lora_A"].double()) for n in LAYERS}
        return reply(msg, "factors", {k: v.numpy() for k, v in rs.items()}, self.weight(pid))

    def exact(self, rnd: int) -> dict[str, torch.Tensor]:
        total = sum(self.weight(p) for p in range(NODES))
        return {k: sum(self.weight(p) / total * self.local[(rnd, p)][k] for p in range(NODES))
                for k in self.local[(rnd, 0)]}


def _strategy(**kw) -> FedSB:
    kw.setdefault("init_step", STEP)
    return FedSB(layers=LAYERS, rank=RANK, alpha=ALPHA, run_seed=SEED, **kw)


def test_the_merge_is_the_weighted_average_of_the_clients_local_models():
    clients = Clients()
    seen = run_strategy(_strategy(), ArrayRecord(_initial()), 3, NODES, clients)
    for rnd in (1, 2, 3):
        got, exact = seen[rnd].to_torch_state_dict(), clients.exact(rnd)
        for key in exact:
            assert torch.allclose(got[key].double(), exact[key], atol=1e-5, rtol=0), (rnd, key)


def test_the_init_is_the_truncated_svd_of_the_mean_gradients_signed_step():
    """Round 1 starts at ``W0 + trunc_r(-eta sign(G))`` (numpy's SVD), ``G`` the clients'
    example-weighted mean gradient; ``B``, ``A`` have orthonormal columns / rows."""
    clients = Clients()
    strategy = _strategy(init_clients=2)
    run_strategy(strategy, ArrayRecord(_initial()), 1, NODES, clients)
    assert len(clients.gradients) == 2
    total = sum(clients.weight(p) for p in clients.gradients)
    start = next(global_state(m.content) for r, _, m in clients.messages
                 if r == 1 and m.content["config"]["mode"] == "adapters")
    for n in LAYERS:
        g = sum(clients.weight(p) / total * gr[f"{n}.weight"].double()
                for p, gr in clients.gradients.items())
        u, s, vt = np.linalg.svd(-STEP * np.sign(g.numpy()))
        best = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
        assert np.allclose(start[f"{n}.weight"].double().numpy() - _initial()[f"{n}.weight"]
                           .double().numpy(), best, atol=1e-6), n
        b, a = strategy.frame[f"{n}.lora_B"].double(), strategy.frame[f"{n}.lora_A"].double()
        assert torch.allclose(b.T @ b, torch.eye(RANK, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(a @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-6)


def _nbytes(*shapes) -> int:
    return sum(len(Array(np.zeros(s, dtype=np.float32)).data) for s in shapes)


def test_one_init_client_uploads_the_rank_r_svd_and_the_init_is_unchanged():
    """With one init client (the default) it sends ``U_r``, ``S_r``, ``V_rᵀ`` of its own
    ``-eta sign(G)``: ``r (d_in + d_out + 1)`` numbers per layer, not ``d_in d_out``, and
    ``B``, ``A`` and the start ``W0 + s B R_0 A`` are those of the full-gradient path."""
    clients = Clients()
    strategy = _strategy()
    run_strategy(strategy, ArrayRecord(_initial()), 1, NODES, clients)
    (pid, grads), = clients.gradients.items()
    start = next(global_state(m.content) for r, _, m in clients.messages
                 if r == 1 and m.content["config"]["mode"] == "adapters")
    for n in LAYERS:
        b, a, r0 = lora_sb_init(grads[f"{n}.weight"], RANK, STEP, SCALE)  # the full path
        assert torch.allclose(strategy.frame[f"{n}.lora_B"].double(), b, atol=1e-6), n
        assert torch.allclose(strategy.frame[f"{n}.lora_A"].double(), a, atol=1e-6), n
        assert torch.allclose(start[f"{n}.weight"].double() - _initial()[f"{n}.weight"].double(),
                              SCALE * b @ r0 @ a, atol=1e-6), n
    up = sum(_nbytes((s.d_out, RANK), (RANK,), (RANK, s.d_in)) for s in LAYERS.values())
    assert strategy.ledger.round_kinds(1, "up")["gradient"] == up
    ask = next(m for _, _, m in clients.messages if m.content["config"]["mode"] == "gradient")
    assert ask.content["config"]["init-rank"] == RANK


def test_several_init_clients_upload_their_full_gradients():
    """The mean gradient is needed before the sign: each init client sends ``d_out x d_in``."""
    clients = Clients()
    strategy = _strategy(init_clients=2)
    run_strategy(strategy, ArrayRecord(_initial()), 1, NODES, clients)
    assert strategy.ledger.round_kinds(1, "up")["gradient"] == 2 * _nbytes(
        *(s.weight_shape for s in LAYERS.values()))


def test_lora_sb_init_follows_the_papers_orientation():
    """The paper's code takes the SVD of ``Gᵀ`` (``d_in x d_out``): ``B = V``, ``A = Uᵀ``,
    ``R = S``; at ``alpha = r`` (scale 1) fedrac's factors give the same ``B R A``."""
    g = _random(3, (9, 6)).double()
    b, a, r0 = lora_sb_init(g, 3, 0.5, scale=1.0)
    u, s, vt = np.linalg.svd((-0.5 * np.sign(g.numpy())).T)
    assert np.allclose((b @ r0 @ a).numpy(), (vt.T[:, :3] * s[:3]) @ u[:, :3].T, atol=1e-9)
    assert np.allclose(np.diag(r0.numpy()), s[:3])
    _, _, r_half = lora_sb_init(g, 3, 0.5, scale=0.5)
    assert torch.allclose(r_half, 2 * r0)


def test_the_upload_is_r_squared_per_layer_and_b_a_go_down_once_per_node():
    clients = Clients()
    strategy = _strategy()
    run_strategy(strategy, ArrayRecord(_initial()), 3, NODES, clients)
    one = len(Array(np.zeros((RANK, RANK), dtype=np.float32)).data)
    for rnd in (1, 2, 3):
        assert strategy.ledger.round_kinds(rnd, "up")["factors"] == NODES * len(LAYERS) * one
    frame = sum(len(Array(v.numpy()).data) for v in strategy.frame.values())
    assert strategy.ledger.round_kinds(1, "down")["factors"] == NODES * frame
    assert "factors" not in strategy.ledger.round_kinds(2, "down")
    assert strategy.ledger.round_kinds(1, "up")["gradient"] > 0  # the one-off init gradient
    sent = [(r, "adapters" in m.content) for r, _, m in clients.messages
            if m.content["config"]["mode"] == "adapters"]
    assert sent == [(1, True)] * NODES + [(2, False)] * NODES + [(3, False)] * NODES


def test_a_node_without_the_frame_fails_once_and_gets_it_again():
    content = RecordDict({"config": ConfigRecord({"frame-fingerprint": "0" * 16})})
    with pytest.raises(RuntimeError, match="holds no B, A of this run"):
        with_frame(content, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                    run_config={}))
    frame = {"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.ones(4, 2)}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    sent = RecordDict({"adapters": ArrayRecord(frame),
                       "config": ConfigRecord({"frame-fingerprint": fingerprint(frame)})})
    with_frame(sent, context)
    assert STATE_FRAME in context.state
    later = with_frame(RecordDict({"config": sent["config"]}), context)
    assert set(later["adapters"].keys()) == set(frame)


def test_random_init_starts_at_the_global_weights():
    clients = Clients()
    seen = run_strategy(_strategy(init="random"), ArrayRecord(_initial()), 1, NODES, clients)
    assert not clients.gradients
    start = next(global_state(m.content) for _, _, m in clients.messages)
    for key, w in _initial().items():
        assert torch.equal(start[key], w)
    assert set(seen[1].keys()) == set(_initial())


def test_the_middle_factor_on_the_forward_path():
    """``base(x) + s B R A x``: only ``R`` is trained; the effective weight says the same."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    model = nn.Sequential(lin)
    layers = find_target_layers(model, ["0"])
    a, b, r = torch.randn(2, 5), torch.randn(4, 2), torch.randn(2, 2)
    attach_adapters(model, layers, {"0": (a, b)}, 2, 3.0, {"0": "R"}, {"0": r})
    x = torch.randn(8, 5)
    want = x @ (lin.weight + 1.5 * b @ r @ a).T + lin.bias
    assert torch.allclose(model(x), want, atol=1e-5)
    assert torch.allclose(effective_weights(model)["0.weight"], lin.weight + 1.5 * b @ r @ a,
                          atol=1e-6)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_adapter.lora_R"]
    assert set(adapter_factors(model)) == {"0.lora_R"}
    remove_adapters(model)


def test_layer_gradients_are_the_mean_loss_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    layers = find_target_layers(model, ["0"])
    got = layer_gradients(model, layers, x, y, 100, 0, resolve_device("cpu"), batch_size=4)
    model.zero_grad()
    w = model[0].weight
    w.requires_grad_(True)
    nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(got["0.weight"], w.grad, atol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.rank=100"], "strategy.rank=100 is larger than layer"),
    (["privacy=dp"], "strategy.init=gradient is not allowed with privacy=dp"),
    (["strategy.init=svd"], "strategy.init='svd' is not allowed for fed_sb; allowed: gradient"),
    (["strategy.init_samples=0"], "strategy.init_samples=0 is not allowed"),
    (["strategy.download=sometimes"], "strategy.download='sometimes' is not allowed"),
    (["+strategy.client_ranks=[1,2]"], "strategy.client_ranks"),
    (["strategy.train_factor=A"], "strategy.train_factor"),
])
def test_bad_input_names_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=None) as exc:
        run_config(tmp_path, "strategy=fed_sb", *overrides)
    assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("arch", [pytest.param("bert", marks=pytest.mark.slow), "gpt2"])
def test_fed_sb_on_a_tiny_transformers_model(arch, tmp_path, capsys):
    """model=hf end to end (gpt2's Conv1D stores its weights transposed): each round uploads
    r² per target layer, the export is written, and on bert it learns (the tiny gpt2 does not
    learn this task with rac_lora either)."""
    import json

    from tests import hf_models as H
    from tests.test_hf_e2e import _rows, overrides, run

    ckpt = {arch: H.build_checkpoint(tmp_path / arch, arch),
            "sentiment": H.write_csv(tmp_path / "s.csv", H.sentiment_rows(160))}
    out = tmp_path / "run"
    stdout = run(overrides(ckpt, out, "classification", "strategy=fed_sb", "strategy.rank=4",
                           "num_rounds=4" if arch == "bert" else "num_rounds=2",
                           "client.lr=0.02", arch=arch), tmp_path, False, capsys)
    summary = json.loads((out / "summary.json").read_text())
    if arch == "bert":
        assert summary["final_accuracy"] >= 0.8 > summary["initial_accuracy"], summary
    model = H.build_checkpoint(tmp_path / "again", arch)
    from transformers import AutoModelForSequenceClassification

    from fedrac.adapters import default_target_modules

    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    layers = find_target_layers(net, default_target_modules(net))
    one = len(Array(np.zeros((4, 4), dtype=np.float32)).data)
    assert int(_rows(out)[2]["bytes_up_factors"]) == 3 * len(layers) * one
    assert "adapter/ (PEFT LoRA, rank auto: 4" in stdout
    assert int(_rows(out)[1]["bytes_up_gradient"]) > 0 == int(_rows(out)[2]["bytes_up_gradient"])
    second = _rows(out)[2]  # download=auto is delta on model=hf: R_bar and the head
    assert int(second["bytes_down_weights"]) == 0 < int(second["bytes_down_deltas"])
    assert int(second["bytes_down"]) <= 3 * int(second["bytes_up"])


@pytest.mark.parametrize("extra", [["privacy=dp"], ["secagg=plus"], ["aggregation=median"],
                                   ["privacy=local_dp"]])
def test_random_init_serves_dp_secagg_and_robust_rules(extra, tmp_path):
    cfg = run_config(tmp_path, "strategy=fed_sb", "strategy.init=random", *extra)
    assert cfg["strategy"]["name"] == "fed_sb"


def test_the_default_init_step_is_the_first_warm_up_steps_lr():
    """The paper's ``eta = lr / (warmup_ratio * total_steps)``: the lr of the first step."""
    def step(**client):
        return FedSB(layers=LAYERS, rank=RANK, alpha=ALPHA, run_seed=SEED,
                     client=client_settings(**client)).init_step

    assert step(lr=0.1, warmup_steps=4) == pytest.approx(0.025)
    assert step(lr=0.1, warmup_steps=0) == pytest.approx(0.1)
