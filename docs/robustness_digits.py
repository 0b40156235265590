"""Digits end to end: the honest run against each attack (docs/robustness.md, section 4).

The first client(s) to reply in every round attack, through fedrac's real ClientApp.
Usage (REPO may be an older checkout, to measure "before"):

    ROUNDS=30 python docs/robustness_digits.py REPO OUT_DIR [overrides...]

Env: STRATEGIES (default fedavg,rac_lora), ATTACKS (default all five). Prints the final
accuracy, the distance to the honest model relative to its norm, and the model's dtypes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys

ATTACKS = "weight_1e30,overflow_1e308,scaled_1e20,int64,float16"


def attacked_app(cfg, attack):
    """fedrac's ClientApp whose first ``count`` replies per round are poisoned."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from clients import handlers
    from fedrac.wire.records import to_state_dict

    count = {"overflow_1e308": 2}.get(attack, 1 if attack else 0)
    calls: dict[int, int] = {}
    app = ClientApp()

    @app.train()
    def train(msg, context):
        out = handlers.handle_train(cfg, msg, context)
        rnd = int(msg.content["config"]["server-round"])
        calls[rnd] = calls.get(rnd, 0) + 1
        if calls[rnd] > count or out.has_error():
            return out
        key = "arrays" if msg.content["config"]["mode"] == "full" else "factors"
        t = to_state_dict(out.content[key])
        ref = (to_state_dict(msg.content["arrays"]) if key == "arrays"
               else {k: torch.zeros_like(v) for k, v in t.items()})
        metrics = dict(out.content["metrics"])
        if attack == "weight_1e30":
            metrics["num-examples"] = 1e30
        elif attack == "overflow_1e308":
            metrics["num-examples"] = 1e308
        elif attack == "scaled_1e20":
            t = {k: ref[k] + 1e20 * (v - ref[k]) for k, v in t.items()}
        elif attack in ("int64", "float16"):
            t = {k: v.to(getattr(torch, attack)) for k, v in t.items()}
        return Message(RecordDict({key: ArrayRecord(t), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        return handlers.handle_evaluate(cfg, msg, context)

    return app


def run(strategy: str, attack: str | None, out: str, extra: list[str]):
    """Final accuracy and weights of one digits run."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from fedrac import run as runmod
    from fedrac.settings.config import conf_dir, validate

    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=[
            f"strategy={strategy}", f"num_rounds={os.environ.get('ROUNDS', 10)}",
            f"output_dir={out}", *extra]))
    runmod.make_client_app = lambda c: attacked_app(c, attack)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = runmod.run_experiment(cfg)
    return summary["final_accuracy"], load_file(f"{out}/model.safetensors")


def main() -> None:
    repo, out, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.path.insert(0, repo)
    os.chdir(repo)
    logging.disable(logging.WARNING)
    for strategy in os.environ.get("STRATEGIES", "fedavg,rac_lora").split(","):
        acc_h, w_h = run(strategy, None, f"{out}/{strategy}-honest", extra)
        print(strategy, "honest", f"acc {acc_h:.4f}", flush=True)
        norm = math.sqrt(sum(float(v.double().norm()) ** 2 for v in w_h.values()))
        for attack in os.environ.get("ATTACKS", ATTACKS).split(","):
            acc, w = run(strategy, attack, f"{out}/{strategy}-{attack}", extra)
            dist = math.sqrt(sum(float((w[k].double() - w_h[k].double()).norm()) ** 2
                                 for k in w_h))
            dtypes = ",".join(sorted({str(v.dtype).removeprefix("torch.") for v in w.values()}))
            print(strategy, attack, f"acc {acc:.4f}", f"dist/||W|| {dist / norm:.3g}",
                  f"dtype {dtypes}", flush=True)


if __name__ == "__main__":
    main()
