"""The paper's toy problem: least squares with a known optimum, plain gradient steps.

``f(W) = 1/2 mean_i ||W x_i - y_i||^2`` with ``y_i = W* x_i`` (realizable, so local
steps cause no client drift) and inputs scaled so the curvature is about
``diag(condition, 1, ..., 1)``. Every client takes ``client.local_steps`` plain
gradient steps of size ``quadratic.step / L`` (``L`` the largest curvature of the
global problem; ``client.refactor`` applies RefLoRA to them) on what the strategy
lets it train: all of ``W`` (FPFT) or the LoRA factors (fedrac's real adapter path:
sketch regeneration, fingerprint check, zero-init). The real strategies run on the
in-process engine; each round logs the relative distance ``||W - W*||_F / ||W*||_F``
to ``metrics.csv``.

Loud-failure extras (arXiv 2502.09376; ``+experiment=loud_failure``): the clients apply
``client.weight_decay`` as ``client.weight_decay_mode`` says (coupled: the nuclear-norm
penalty ``lambda/s ||X||_*``); ``quadratic.init=random`` starts the trained factor of a
fresh adapter at ``init_scale * N(0, 1)`` entries (shared by the clients, seeded by the run
seed and round) instead of zero. Each round's row also has the rank, norms and the
optimality certificate of ``X = W - W0`` (:mod:`fedrac.experiments.certificate`) against
the reference minimum from proximal gradient with singular-value thresholding; the run
writes ``spectrum.csv``, warns when it "fails loudly" and records it in ``summary.json``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from clients.handlers import bind_reply, global_state, prepare_adapters, settings_from
from fedrac.adapters import adapter_factors, attached, find_target_layers, remove_adapters
from fedrac.adapters.sketch import derive_seed
from fedrac.engines.inline import run_inline
from fedrac.experiments.certificate import certify, reference_minimum
from fedrac.server.spectrum import global_factors, monitor_from_config
from fedrac.settings.errors import ConfigError
from fedrac.settings.typed import settings_of
from fedrac.training.local import TrainSettings, make_optimizer, step_hooks
from fedrac.wire.ledger import ByteLedger
from strategies import build_strategy

log = logging.getLogger(__name__)

DEFAULTS = {"d_out": 6, "d_in": 8, "condition": 10.0, "samples": 160, "step": 1.0,
            "problem_seed": 0, "init": "zero", "init_scale": 0.5, "loud_factor": 1.0,
            "certificate_tol": 1e-3}
INIT_STREAM = 11  # derive_seed(run_seed, round, INIT_STREAM) draws quadratic.init=random
INITS = ("zero", "random")
# where the certificate is the theory's (2502.09376): persistent factors, both decayed.
# Chains (rac_lora, cola, flora) decay only the round's increment, ffa_lora only B, and
# fedex_lora adds residuals outside the factors: their fixed points need not be stationary.
COVERED = ("fedit",)


def make_problem(q: Mapping[str, Any], num_clients: int):
    """``(W*, [X_k], [Y_k], L)``: the optimum, the clients' data and the smoothness constant."""
    gen = torch.Generator().manual_seed(int(q["problem_seed"]))
    d_out, d_in = int(q["d_out"]), int(q["d_in"])
    w_star = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    scale = torch.ones(d_in, dtype=torch.float64)
    scale[0] = math.sqrt(float(q["condition"]))
    x = torch.randn(int(q["samples"]), d_in, generator=gen, dtype=torch.float64) * scale
    xs = list(torch.chunk(x, num_clients))
    ys = [xk @ w_star.T for xk in xs]
    lip = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    return w_star, xs, ys, lip


def _model(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(OrderedDict(lin=nn.Linear(d_in, d_out, bias=False))).double()


def random_init(model: nn.Module, content: RecordDict, run_seed: int, scale: float) -> None:
    """``quadratic.init=random``: a fresh adapter's zero trained factor gets ``scale * N(0, 1)``
    entries, the same on every client of the round (no ``adapters`` sent: a fresh link)."""
    if "adapters" in content:
        return
    gen = torch.Generator().manual_seed(
        derive_seed(run_seed, int(content["config"]["server-round"]), INIT_STREAM))
    for _, _, module in attached(model):
        for key in ("lora_A", "lora_B"):
            p = getattr(module, key)
            if isinstance(p, nn.Parameter) and not bool(p.detach().any()):
                with torch.no_grad():
                    p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _settings(cfg: Mapping[str, Any], config: Mapping[str, Any], lr: float) -> TrainSettings:
    """Plain gradient steps of size ``lr`` with the message's weight decay and its mode."""
    sent = settings_from(config)
    return TrainSettings(optimizer="sgd", lr=lr, weight_decay=sent.weight_decay,
                         weight_decay_mode=sent.weight_decay_mode)


def quadratic_client(cfg: Mapping[str, Any], xs, ys, lip: float) -> ClientApp:
    """A ClientApp taking plain gradient steps on its least-squares share."""
    q = {**DEFAULTS, **cfg.get("quadratic", {})}
    steps = int(cfg["client"].get("local_steps") or 1)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        content = msg.content
        model = _model(int(q["d_in"]), int(q["d_out"]))
        model.load_state_dict(global_state(content))
        full = str(content["config"]["mode"]) == "full"
        if not full:
            prepare_adapters(model, find_target_layers(model, ["lin"]), content,
                             int(content["config"]["server-round"]))
            if q["init"] == "random":
                random_init(model, content, int(cfg["seed"]), float(q["init_scale"]))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, _settings(cfg, content["config"], float(q["step"]) / lip))
        hooks = step_hooks(model, settings_from(content["config"]))
        loss = torch.zeros(())
        for _ in range(steps):
            opt.zero_grad()
            loss = 0.5 * ((model(xs[pid]) - ys[pid]) ** 2).sum(dim=1).mean()
            loss.backward()
            if hooks is not None:
                hooks.before_step()
            opt.step()
            if hooks is not None:
                hooks.after_step(opt)
        if full:
            key, out = "arrays", {k: v.detach() for k, v in model.state_dict().items()}
        else:
            key, out = "factors", adapter_factors(model)
            remove_adapters(model)
        metrics = MetricRecord({"num-examples": len(ys[pid]), "train-loss": float(loss.detach()),
                                "train-seconds": 0.0})
        return bind_reply(msg, Message(RecordDict({key: ArrayRecord(out), "metrics": metrics}),
                                       reply_to=msg))

    return app


def run_quadratic(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run the configured strategy on the quadratic; write metrics.csv, spectrum.csv and
    summary.json (with the certificate of the final point)."""
    q = {**DEFAULTS, **cfg.get("quadratic", {})}
    if q["init"] not in INITS:
        raise ConfigError(f"quadratic.init={q['init']!r} is not allowed; allowed: "
                          f"{', '.join(INITS)}")
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    n = int(cfg["num_clients"])
    w_star, xs, ys, lip = make_problem(q, n)
    d_out, d_in = int(q["d_out"]), int(q["d_in"])
    layers = find_target_layers(_model(d_in, d_out), ["lin"])
    ledger = ByteLedger()
    agg = dict(cfg.get("aggregation") or {})
    if agg.get("max_client_weight", "auto") == "auto":  # the toy's partitions, not the dataset's
        agg["max_client_weight"] = max(len(xk) for xk in xs)
    settings = settings_of({**cfg, "aggregation": agg, "output_dir": str(out)})
    try:
        strategy = build_strategy(settings, layers, ledger)
    except ValueError as err:  # rank, sketch, side: checked against this problem's layer
        raise ConfigError(str(err)) from err
    x_all = torch.cat(xs)
    sigma = x_all.T @ x_all / len(x_all)

    def grad(w: torch.Tensor) -> torch.Tensor:  # of L(W) = 1/2 mean ||W x - W* x||^2, W0 = 0
        return (w - w_star) @ sigma

    adapter = getattr(strategy, "layers", None) is not None and hasattr(strategy, "scale")
    lam = float(cfg["client"].get("weight_decay") or 0.0)
    scale = float(strategy.scale) if adapter else 1.0
    rank = int(cfg["strategy"].get("rank", min(d_out, d_in))) if adapter else min(d_out, d_in)
    x_ref = reference_minimum(grad, (d_out, d_in), lip, lam / scale) if adapter else w_star
    w0 = torch.zeros(d_out, d_in, dtype=torch.float64)
    monitor = monitor_from_config(settings.run, layers, {"lin.weight": w0})
    rows: list[dict[str, float]] = []
    last: dict[str, Any] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
        w = arrays.to_torch_state_dict()["lin.weight"].to(torch.float64)
        d = float(torch.linalg.norm(w - w_star) / torch.linalg.norm(w_star))
        row = {"round": server_round, "distance": d if math.isfinite(d) else math.inf,
               "bytes_up": ledger.round_total(server_round, "up"),
               "bytes_down": ledger.round_total(server_round, "down")}
        if bool(torch.isfinite(w).all()):
            c = certify(w - w0, grad(w), x_ref, lam, scale, lip, rank,
                        tol=float(q["certificate_tol"]), loud_factor=float(q["loud_factor"]))
            last["certificate"] = c
            row.update({"rank": c.rank, "nuclear_norm": float(torch.linalg.svdvals(w - w0).sum()),
                        "frobenius_norm": c.frobenius_norm, "grad_norm": c.grad_norm,
                        "certificate": c.ratio, "prox_residual": c.prox_residual,
                        "ref_distance": c.ref_distance})
            monitor.observe(server_round, {"lin.weight": w}, global_factors(strategy))
        rows.append(row)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord({"lin.weight": w0.clone()})
        strategy.start(grid, initial, num_rounds=int(cfg["num_rounds"]),
                       evaluate_fn=evaluate_fn)

    print(f"fedrac: quadratic, {cfg['strategy']['name']}, {n} clients, "
          f"{cfg['num_rounds']} rounds; results in {out}", flush=True)
    run_inline(server, quadratic_client(cfg, xs, ys, lip), n)
    monitor.close()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    rounds = [r for r in rows if r["round"] > 0]
    s = cfg["strategy"]
    cert = last.get("certificate")
    certificate = None
    if adapter and cert is not None:
        certificate = {**cert.as_dict(), "covered": s["name"] in COVERED,
                       "diverged": not math.isfinite(rows[-1]["distance"]), "lambda": lam,
                       "scale": scale, "adapter_rank": rank,
                       "weight_decay_mode": cfg["client"].get("weight_decay_mode", "auto"),
                       "init": q["init"], "ref_nuclear_norm":
                       float(torch.linalg.svdvals(x_ref).sum()),
                       "tolerance": float(q["certificate_tol"]),
                       "loud_factor": float(q["loud_factor"])}
        if cert.fails_loudly:
            log.warning("quadratic: %s fails loudly: rank %d >= adapter rank %d, ||X||_F %.3g >= "
                        "%.3g ||X_ref||_F, certificate ||grad||_2 / (lambda/s) = %.3g",
                        s["name"], cert.rank, rank, cert.frobenius_norm,
                        float(q["loud_factor"]) * cert.ref_frobenius_norm, cert.ratio)
        elif not cert.holds and lam > 0:
            log.warning("quadratic: %s is not at the nuclear-norm minimum (certificate "
                        "||grad||_2 / (lambda/s) = %.3g, proximal residual %.3g, rank %d, "
                        "||X||_F %.3g vs %.3g)", s["name"], cert.ratio, cert.prox_residual,
                        cert.rank, cert.frobenius_norm, cert.ref_frobenius_norm)
    summary = {
        "label": s["name"] + (f" r={s['rank']}" if s["name"] != "fedavg" else ""),
        "strategy": s["name"], "rounds": len(rounds),
        "final_distance": rows[-1]["distance"],
        "best_distance": min(r["distance"] for r in rows),
        "bytes_up_per_round": sum(r["bytes_up"] for r in rounds) / max(len(rounds), 1),
        "bytes_down_per_round": sum(r["bytes_down"] for r in rounds) / max(len(rounds), 1),
        "bytes_by_kind": ledger.totals(), "lipschitz": lip,
        "certificate": certificate,
        "fails_loudly": bool(certificate and certificate["fails_loudly"]),
        "spectrum": monitor.summary(),
        "config": {"strategy": dict(s), "num_clients": n, "quadratic": q,
                   "local_steps": cfg["client"].get("local_steps"),
                   "weight_decay": lam,
                   "weight_decay_mode": cfg["client"].get("weight_decay_mode", "auto")},
    }
    from fedrac.atomic import write_json

    write_json(out / "summary.json", summary)  # strict JSON: a diverged distance is null
    print(f"final relative distance to W*: {summary['final_distance']:.3e}", flush=True)
    return summary
