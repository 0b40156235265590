"""The certificate of 2502.09376 on the quadratic toy: reference minimum, FedIT's covered case,
the chain method flagged, and the runner's records."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from fedrac.adapters.sketch import derive_seed, make_sketch
from fedrac.experiments.certificate import certify, reference_minimum, svt
from fedrac.experiments.quadratic import make_problem, run_quadratic
from fedrac.settings.config import conf_dir, validate
from strategies.two_factor import FRESH_STREAM


def _cfg(tmp_path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=["+experiment=loud_failure", *overrides]))
    cfg["output_dir"] = str(tmp_path / "_".join(o.split("=")[-1] for o in overrides))
    return cfg


def test_reference_minimum_is_singular_value_thresholding_for_identity_curvature():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    ref = reference_minimum(lambda x: x - target, (5, 7), 1.0, 1.3)
    assert torch.allclose(ref, svt(target, 1.3), atol=1e-10)
    assert int((torch.linalg.svdvals(ref) > 1e-9).sum()) < 5  # thresholding cut some values


def test_certificate_holds_at_the_minimum_and_flags_a_large_full_rank_point():
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    lam, s = 2.0, 1.0
    ref = reference_minimum(lambda x: x - target, (5, 7), 1.0, lam / s)
    at_ref = certify(ref, ref - target, ref, lam, s, 1.0, adapter_rank=2)
    assert at_ref.holds and not at_ref.fails_loudly and at_ref.ratio <= 1.0 + 1e-6
    # the unregularised optimum: full rank, larger than the reference, not the penalised min
    wide = certify(target, torch.zeros_like(target), ref, lam, s, 1.0, adapter_rank=2)
    assert wide.ratio == 0.0 and not wide.holds and wide.fails_loudly
    # a small point off the minimum fails the certificate without being loud
    small = 0.1 * ref
    quiet = certify(small, small - target, ref, lam, s, 1.0, adapter_rank=2)
    assert not quiet.holds and not quiet.fails_loudly


def test_fedit_on_the_toy_is_gradient_descent_on_the_decayed_factored_problem(tmp_path):
    cfg = _cfg(tmp_path, "strategy=fedit", "client.weight_decay=3.0", "quadratic.step=0.5",
               "num_rounds=40")
    run_quadratic(cfg)
    rows = list(csv.DictReader(open(tmp_path / "fedit_3.0_0.5_40" / "metrics.csv")))
    # the same by hand: coupled decay lambda on A and B, plain steps of 0.5 / L, s = 1
    q = cfg["quadratic"]
    w_star, xs, _, lip = make_problem(q, 1)
    sigma = xs[0].T @ xs[0] / len(xs[0])
    a = make_sketch(derive_seed(cfg["seed"], 1, FRESH_STREAM), "lin.lora_A", (2, 8),
                    "orthogonal").double().requires_grad_()
    b = torch.zeros(6, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([a, b], lr=0.5 / lip, weight_decay=3.0)
    for _ in range(40):
        opt.zero_grad()
        x = b @ a
        (0.5 * torch.einsum("ij,jk,ik->", x - w_star, sigma, x - w_star)).backward()
        opt.step()
    x = (b @ a).detach()
    assert float(rows[-1]["nuclear_norm"]) == pytest.approx(
        float(torch.linalg.svdvals(x).sum()), rel=1e-4)
    assert float(rows[-1]["frobenius_norm"]) == pytest.approx(float(torch.linalg.norm(x)),
                                                              rel=1e-4)


def test_fedit_reaches_the_certified_minimum_and_the_chain_fails_loudly(tmp_path, caplog):
    ok = run_quadratic(_cfg(tmp_path, "strategy=fedit", "client.weight_decay=4.0",
                            "quadratic.step=0.2", "num_rounds=250"))  # certified from ~150
    c = ok["certificate"]
    assert c["covered"] and c["holds"] and not ok["fails_loudly"]
    assert c["rank"] == c["ref_rank"] == 1 and c["ref_distance"] < 1e-3
    with caplog.at_level(logging.WARNING):
        chain = run_quadratic(_cfg(tmp_path, "strategy=rac_lora", "client.weight_decay=4.0",
                                   "quadratic.step=0.5", "num_rounds=100"))
    # decay reaches only each round's increment: the chain heads for W* (rank 6), far from
    # the rank-1 minimum of the penalised problem
    c = chain["certificate"]
    assert not c["covered"] and chain["fails_loudly"] and c["rank"] == 6
    assert "fails loudly" in caplog.text
    saved = json.loads((tmp_path / "rac_lora_4.0_0.5_100" / "summary.json").read_text())
    assert saved["fails_loudly"] is True
    spectrum = list(csv.DictReader(open(tmp_path / "rac_lora_4.0_0.5_100" / "spectrum.csv")))
    assert [int(r["round"]) for r in spectrum] == [100]  # monitor_every=100
