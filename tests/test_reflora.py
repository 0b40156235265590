"""RefLoRA (fedrac/adapters/reflora.py): balanced refactoring, its preconditioned form,
RefLoRA-S."""

import pytest
import torch
from torch import nn

from fedrac.adapters.reflora import (
    Refactorer,
    balance,
    precondition_grads,
    preconditioners,
    rescale_scalar,
)
from fedrac.experiments.reflora_toy import factorize, make_target, steps_to

SHAPES = [(1, 8, 6), (3, 10, 7), (4, 20, 30), (8, 64, 16)]


def _factors(r, d_in, d_out, seed=0, b_scale=1e-2):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d_in, generator=gen, dtype=torch.float64) * 3
    b = torch.randn(d_out, r, generator=gen, dtype=torch.float64) * b_scale
    return a, b


@pytest.mark.parametrize("r,d_in,d_out", SHAPES)
def test_balance_keeps_the_product_and_balances_the_factors(r, d_in, d_out):
    a, b = _factors(r, d_in, d_out)
    assert (a @ a.T - b.T @ b).abs().max() > 1.0  # far from balanced before
    a2, b2 = balance(a, b)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-10, rtol=0)
    assert torch.allclose(a2 @ a2.T, b2.T @ b2, atol=1e-10, rtol=0)
    # the balanced Gram is diag(singular values of B A) in the rotated basis
    sv = torch.linalg.svdvals(b @ a)[:r]
    assert torch.allclose(torch.linalg.eigvalsh(a2 @ a2.T).flip(0), sv, atol=1e-10)


@pytest.mark.parametrize("r,d_in,d_out", SHAPES[:3])
def test_preconditioned_step_equals_a_step_in_the_balanced_factorization(r, d_in, d_out):
    """SGD on (A, B) with ∇A <- S⁻¹∇A, ∇B <- ∇B S gives the product that one SGD step from the
    balanced factors gives (the official code's pre-step hook is the refactoring)."""
    a, b = _factors(r, d_in, d_out, seed=1)
    target = torch.randn(d_out, d_in, dtype=torch.float64)
    lr = 1e-3

    def grads(a_, b_):
        a_, b_ = nn.Parameter(a_.clone()), nn.Parameter(b_.clone())
        (0.5 * ((b_ @ a_ - target) ** 2).sum()).backward()
        return a_, b_

    pa, pb = grads(a, b)
    precondition_grads(pa, pb)
    pre = (pb - lr * pb.grad) @ (pa - lr * pa.grad)
    ba, bb = grads(*balance(a, b))
    refactored = (bb - lr * bb.grad) @ (ba - lr * ba.grad)
    assert torch.allclose(pre, refactored, atol=1e-10, rtol=0)
    s, s_inv = preconditioners(a, b)
    assert torch.allclose(s @ s_inv, torch.eye(r, dtype=torch.float64), atol=1e-8)


def test_scalar_form_balances_norms_and_rescales_adam_state():
    a, b = (nn.Parameter(t) for t in _factors(2, 9, 5, seed=2))
    opt = torch.optim.Adam([a, b], lr=1e-2)
    (b @ a).sum().backward()
    opt.step()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)}
    na, nb = float(torch.linalg.norm(a.detach())), float(torch.linalg.norm(b.detach()))
    product = (b @ a).detach().clone()
    c = rescale_scalar(a, b, opt)
    assert c == pytest.approx(nb / na)
    assert torch.allclose(b @ a, product, atol=1e-12)
    assert float(torch.linalg.norm(a.detach())) == pytest.approx(
        float(torch.linalg.norm(b.detach())), rel=1e-12)
    p = c ** 0.5
    for param, g in ((a, 1 / p), (b, p)):  # the gradient of A scales by 1/√c, of B by √c
        old = before[id(param)]
        assert torch.allclose(opt.state[param]["exp_avg"], old["exp_avg"] * g, rtol=1e-12)
        assert torch.allclose(opt.state[param]["exp_avg_sq"], old["exp_avg_sq"] * g * g,
                              rtol=1e-12)


def test_refactorer_leaves_a_zero_factor_alone_then_warms_up_and_keeps_its_interval():
    a = nn.Parameter(torch.randn(2, 6, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))
    hooks = Refactorer([(a, b)], "reflora", interval=2, warmup_steps=1)
    opt = torch.optim.SGD([a, b], lr=0.1)
    target = torch.randn(4, 6, dtype=torch.float64)
    applied = []
    for _ in range(7):
        opt.zero_grad()
        (0.5 * ((b @ a - target) ** 2).sum()).backward()
        grad_b = b.grad.clone()
        hooks.before_step()
        if not torch.count_nonzero(b.detach()):
            assert torch.equal(b.grad, grad_b)  # B = 0: S = 0 would freeze B; skipped
        applied.append(hooks.applied)
        opt.step()
        hooks.after_step(opt)
    assert torch.count_nonzero(b.detach())  # B moved off zero
    # step 0 is warm-up, step 1 the first refactoring, then every second step
    assert applied == [0, 1, 1, 2, 2, 3, 3]


def test_reflora_converges_faster_than_lora_on_the_matrix_factorization_toy():
    """RefLoRA's Figure 2 setting (32x32 target of rank 4, condition 10, GD): measured
    steps to a 1e-6 relative loss at lr 0.02: LoRA 558, RefLoRA 269, RefLoRA-S 301."""
    y = make_target()
    goal = 1e-6 * 0.5 * float((y ** 2).sum())
    steps = {m: steps_to(factorize(y, 4, m, lr=0.02, steps=800), goal)
             for m in ("none", "reflora", "reflora_s")}
    assert steps["none"] is not None and steps["reflora"] is not None
    assert steps["reflora"] < 0.6 * steps["none"]
    assert steps["reflora_s"] is not None and steps["reflora_s"] < 0.7 * steps["none"]


@pytest.mark.parametrize("strategy", ["rac_lora", "ffa_lora", "fedavg"])
def test_refactoring_a_shared_sketch_is_refused_with_one_line(tmp_path, strategy):
    from fedrac.settings.config import ConfigError
    from tests.helpers import run_config

    with pytest.raises(ConfigError) as err:
        run_config(tmp_path, f"strategy={strategy}", "client.refactor=reflora")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("client.refactor='reflora' is not allowed; allowed: none for "
                           f"strategy {strategy}")


def test_refactor_values_are_checked_and_sent_only_when_on(tmp_path):
    from fedrac.settings.config import ConfigError
    from fedrac.settings.typed import settings_of
    from strategies.base import client_config_record
    from tests.helpers import run_config

    with pytest.raises(ConfigError, match=r"client.refactor='svd' is not allowed; allowed: "
                                          r"none, reflora, reflora_s"):
        run_config(tmp_path, "strategy=fedit", "client.refactor=svd")
    with pytest.raises(ConfigError, match=r"client.refactor_interval=0 .* an integer >= 1"):
        run_config(tmp_path, "strategy=cola", "client.refactor=reflora",
                   "client.refactor_interval=0")
    cfg = run_config(tmp_path, "strategy=flora", "client.refactor=reflora_s",
                     "client.refactor_warmup_steps=3")
    sent = client_config_record(settings_of(cfg).client)
    assert sent["refactor"] == "reflora_s" and sent["refactor-warmup-steps"] == 3
    plain = client_config_record(settings_of(run_config(tmp_path, "strategy=fedit")).client)
    assert not any(k.startswith("refactor") for k in plain)
