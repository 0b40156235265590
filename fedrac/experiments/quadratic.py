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
"""

from __future__ import annotations

import csv
import json
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

from clients.handlers import global_state, prepare_adapters, settings_from
from clients.local_training import step_hooks
from fedrac.config import ConfigError
from fedrac.engines.inline import run_inline
from fedrac.ledger import ByteLedger
from fedrac.lora import adapter_factors, find_target_layers, remove_adapters
from strategies import build_strategy

DEFAULTS = {"d_out": 6, "d_in": 8, "condition": 10.0, "samples": 160, "step": 1.0,
            "problem_seed": 0}


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
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=float(q["step"]) / lip)
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
        return Message(RecordDict({key: ArrayRecord(out), "metrics": metrics}), reply_to=msg)

    return app


def run_quadratic(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run the configured strategy on the quadratic; write metrics.csv and summary.json."""
    q = {**DEFAULTS, **cfg.get("quadratic", {})}
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    n = int(cfg["num_clients"])
    w_star, xs, ys, lip = make_problem(q, n)
    layers = find_target_layers(_model(int(q["d_in"]), int(q["d_out"])), ["lin"])
    ledger = ByteLedger()
    try:
        strategy = build_strategy(cfg, layers, ledger)
    except ValueError as err:  # rank, sketch, side: checked against this problem's layer
        raise ConfigError(str(err)) from err
    rows: list[dict[str, float]] = []

    def distance(arrays: ArrayRecord) -> float:
        w = arrays.to_torch_state_dict()["lin.weight"].to(torch.float64)
        return float(torch.linalg.norm(w - w_star) / torch.linalg.norm(w_star))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
        d = distance(arrays)
        rows.append({"round": server_round, "distance": d if math.isfinite(d) else math.inf,
                     "bytes_up": ledger.round_total(server_round, "up"),
                     "bytes_down": ledger.round_total(server_round, "down")})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord({"lin.weight": torch.zeros(int(q["d_out"]), int(q["d_in"]),
                                                         dtype=torch.float64)})
        strategy.start(grid, initial, num_rounds=int(cfg["num_rounds"]),
                       evaluate_fn=evaluate_fn)

    print(f"fedrac: quadratic, {cfg['strategy']['name']}, {n} clients, "
          f"{cfg['num_rounds']} rounds; results in {out}", flush=True)
    run_inline(server, quadratic_client(cfg, xs, ys, lip), n)
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rounds = [r for r in rows if r["round"] > 0]
    s = cfg["strategy"]
    summary = {
        "label": s["name"] + (f" r={s['rank']}" if s["name"] != "fedavg" else ""),
        "strategy": s["name"], "rounds": len(rounds),
        "final_distance": rows[-1]["distance"],
        "best_distance": min(r["distance"] for r in rows),
        "bytes_up_per_round": sum(r["bytes_up"] for r in rounds) / max(len(rounds), 1),
        "bytes_down_per_round": sum(r["bytes_down"] for r in rounds) / max(len(rounds), 1),
        "bytes_by_kind": ledger.totals(), "lipschitz": lip,
        "config": {"strategy": dict(s), "num_clients": n, "quadratic": q,
                   "local_steps": cfg["client"].get("local_steps")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"final relative distance to W*: {summary['final_distance']:.3e}", flush=True)
    return summary
