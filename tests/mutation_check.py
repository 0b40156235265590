"""A small mutation check: does the fast suite notice a wrong method? (not a pytest module)

Each mutant replaces one exact snippet of the code under test (a flipped sign, a dropped
scale, swapped factors, a removed check), runs the tests that should catch it (``-x``: the
first failure kills the mutant). It works on a copy of the source tree in a temporary
folder (the checkout is never touched; the copy's packages shadow the editable install):

    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation_check.py          # every mutant
    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation_check.py 3 7      # mutants 3 and 7

Prints one line per mutant (killed / SURVIVED, seconds) and the count.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "__pycache__",
                                ".pytest_cache", ".ruff_cache")
FAST = ["tests/test_baselines.py", "tests/test_faithfulness.py", "tests/test_client_merge.py"]
LORA = ["tests/test_lora.py", *FAST]
SKETCH = ["tests/test_sketch.py"]
FEDSB = ["tests/test_fed_sb.py"]
FEDSB_DELTA = ["tests/test_fed_sb_delta.py", *FEDSB]

# (name, file, original snippet, mutated snippet, tests)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    ("scale alpha/r -> alpha", "strategies/base.py",
     "self.scale = self.alpha / self.rank", "self.scale = self.alpha", FAST),
    ("merge sign flipped", "fedrac/wire/delta_sync.py",
     "(w.to(torch.float64) + spec.delta(", "(w.to(torch.float64) - spec.delta(", FAST),
    ("merge swaps the factors", "fedrac/wire/delta_sync.py",
     "        a, b = pair\n        w = out[spec.weight_key]",
     "        b, a = pair[0].T, pair[1].T\n        w = out[spec.weight_key]", FAST),
    ("aggregate drops the reference", "strategies/aggregation.py",
     "agg = agg + against[key].to(torch.float64)", "agg = agg",
     ["tests/test_robust_aggregation.py"]),  # the mean rule acts on the values directly
    ("two-factor product sign", "strategies/two_factor.py",
     "return spec.delta(a.to(torch.float64), b.to(torch.float64), scale)",
     "return spec.delta(a.to(torch.float64), b.to(torch.float64), -scale)", FAST),
    ("FedEx-LoRA residual sign", "strategies/fedex_lora.py",
     "coefficients = [self.scale * ck for ck in c] + [-self.scale]",
     "coefficients = [self.scale * ck for ck in c] + [self.scale]", FAST),
    ("FLoRA drops the scale", "strategies/flora.py",
     "[self.scale * pk for pk in p]", "[pk for pk in p]", FAST),
    ("FLoRA unweighted stack", "strategies/flora.py",
     "[self.scale * pk for pk in p]", "[self.scale / len(p) for pk in p]", FAST),
    ("COLA never merges", "strategies/cola.py",
     "if server_round % self.merge_every == 0:", "if False:", FAST),
    ("FFA-LoRA resamples its sketch", "strategies/ffa_lora.py",
     "return derive_seed(self.run_seed, 0)",
     "return derive_seed(self.run_seed, server_round)", FAST),
    ("RAC-LoRA never resamples", "strategies/rac_lora.py",
     "first = (server_round - 1) // self.resample_every * self.resample_every + 1",
     "first = 1", ["tests/test_faithfulness.py", "tests/test_quadratic.py"]),
    ("uniform weighting ignored", "strategies/base.py",
     'if self.client_weighting == "uniform":', "if False:", FAST),
    ("LoRA delta drops the scale", "fedrac/adapters/config.py",
     "return (scale * (b @ a)).reshape(weight_shape)", "return (b @ a).reshape(weight_shape)",
     LORA),
    ("LoRA forward path drops the scale", "fedrac/adapters/layer.py",
     "return F.linear(F.linear(x, a), b) * self.scale", "return F.linear(F.linear(x, a), b)",
     LORA),
    ("LoRA rebuilds W + s B A in the forward pass", "fedrac/adapters/layer.py",
     "return F.linear(F.linear(x, a), b) * self.scale", "return F.linear(x, self.delta())",
     ["tests/test_adapter_cost.py"]),
    ("a quantised base is not requantised from the global weights",
     "fedrac/adapters/quantized.py", '                _requantize(module, here)',
     "                pass", ["tests/test_quantized.py"]),
    ("a requantising load skips a weight changed in place", "fedrac/adapters/quantized.py",
     "if held is None or held._version != source[1]:",
     "if held is None:", ["tests/test_quantized.py"]),
    ("a requantising load skips a different tensor", "fedrac/adapters/quantized.py",
     "and held.device == dense.device and torch.equal(held, dense))",
     "and held.device == dense.device)", ["tests/test_quantized.py"]),
    ("the dequantised base is requantised on load", "fedrac/adapters/quantized.py",
     "    return tuple(dense.shape) == (module.out_features, module.in_features) and",
     "    return False and", ["tests/test_quantized.py"]),
    ("bitsandbytes' CPU inference repacking stays on", "fedrac/adapters/quantized.py",
     "            module.support_avx512bf16_for_cpu = False",
     "            pass", ["tests/test_quantized.py"]),
    ("a quantised model keeps the mapped checkpoint", "fedrac/models/hf.py",
     "        own_memory(model)  # drop", "        (model)  # drop", ["tests/test_quantized.py"]),
    ("LoRA trains the wrong factor", "fedrac/adapters/layer.py",
     '(("lora_A", a, trained in ("A", "both")),\n'
     '                                  ("lora_B", b, trained in ("B", "both")))',
     '(("lora_A", a, trained in ("B", "both")),\n'
     '                                  ("lora_B", b, trained in ("A", "both")))', LORA),
    ("auto trains the larger factor", "fedrac/adapters/config.py",
     'return "A" if spec.d_in < spec.d_out else "B"',
     'return "B" if spec.d_in < spec.d_out else "A"', LORA),
    ("gaussian variance off by 15 %", "fedrac/adapters/sketch.py",
     "s = torch.randn(r, k, generator=gen, dtype=torch.float64) / np.sqrt(k)",
     "s = torch.randn(r, k, generator=gen, dtype=torch.float64) / np.sqrt(1.15 * k)", SKETCH),
    ("orthogonal sketch loses its Haar sign fix", "fedrac/adapters/sketch.py",
     "s = (q * signs).T.contiguous()", "s = q.T.contiguous()", SKETCH),
    ("derive_seed forgets the length", "fedrac/adapters/sketch.py",
     'text = f"fedrac.derive_seed:{len(parts)}:" + ",".join(str(p) for p in parts)',
     'text = "fedrac.derive_seed:" + ",".join(str(p) for p in parts if p)', SKETCH),
    ("client skips the fingerprint check", "clients/handlers.py",
     "        check_fingerprint(str(sketch[\"fingerprint\"]),",
     "        (lambda *a: None)(str(sketch[\"fingerprint\"]),", FAST),
    ("RefLoRA P uses Σ_M instead of Σ_M^1/2", "fedrac/adapters/reflora.py",
     "sm_quarter = sm_sq ** 0.25", "sm_quarter = sm_sq ** 0.5", ["tests/test_reflora.py"]),
    ("RefLoRA-S: exp_avg_sq scaled like exp_avg", "fedrac/adapters/reflora.py",
     'state["exp_avg_sq"].mul_(g * g)', 'state["exp_avg_sq"].mul_(g)',
     ["tests/test_reflora.py"]),
    ("RefLoRA preconditions B with S⁻¹", "fedrac/adapters/reflora.py",
     "b.grad.copy_((b.grad.to(torch.float64) @ s)",
     "b.grad.copy_((b.grad.to(torch.float64) @ s_inv)", ["tests/test_reflora.py"]),
    # issue 20: trustworthy runs II (each mutant undoes one fix; its test must turn red)
    ("norm screen ignores trained modules", "strategies/base.py",
     "[joint(r) for r in checked]", "[r.tensors for r in checked]",
     ["tests/test_whole_update.py"]),
    ("DP leaves trained modules out", "strategies/base.py",
     "if self.module_shapes and modules and all(modules):", "if False:",
     ["tests/test_whole_update.py"]),
    ("stale replies accepted", "strategies/base.py",
     "reason = self.stale_reason(server_round, msg, to)", "reason = None",
     ["tests/test_round_binding.py"]),
    ("secagg accepts robust rules", "fedrac/privacy/secagg.py",
     'if agg.get("name", "mean") != "mean":', "if False:", ["tests/test_secagg.py"]),
    ("secagg ignores SIGTERM", "fedrac/privacy/secagg.py",
     "if STOP.requested and server_round < num_rounds:", "if False:",
     ["tests/test_secagg.py"]),
    ("default delta 1/n", "fedrac/privacy/dp.py",
     "return min(float(num_clients) ** -DELTA_EXPONENT, 0.1)", "return 1.0 / num_clients",
     ["tests/test_privacy.py"]),
    ("checkpoint checksum unchecked", "fedrac/server/checkpoint.py",
     '_require(_digest(text, tensors) == meta["sha256"]', '_require(True',
     ["tests/test_checkpoint_integrity.py"]),
    ("checkpoint of another run accepted", "fedrac/server/checkpoint.py",
     '_require(meta.get("run") == run_hash', "_require(True",
     ["tests/test_checkpoint_integrity.py"]),
    ("output folder not locked", "fedrac/server/outputs.py",
     "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
     ["tests/test_output_lock.py"]),
    ("divergence unchecked", "fedrac/server/divergence.py",
     "if bound > 0 and moved > bound:", "if False:", ["tests/test_divergence.py"]),
    ("divergence converts whole tensors", "fedrac/server/divergence.py",
     "    if t.numel() <= CHUNK:", "    if True:", ["tests/test_divergence.py"]),
    ("mean unbounded by default", "strategies/aggregation.py",
     'default_max_update_norm = "auto"  # null under', "default_max_update_norm = None  # ",
     ["tests/test_divergence.py", "tests/test_robust_aggregation.py"]),
    ("local APIs open to every uid", "fedrac/deploy/peer.py",
     "if uid not in allowed and not (", "if False and not (",
     ["tests/test_local_api_owner.py"]),
    ("node user may use the Control API", "fedrac/deploy/peer.py",
     'return path.startswith(prefixes) and "/." not in path', "return True",
     ["tests/test_deploy_run_as.py"]),
    ("SuperNodes not dropped to --run-as", "fedrac/deploy/local.py",
     "                       user.popen_kwargs() if user else None)",
     "                       None)", ["tests/test_deploy_run_as.py"]),
    ("ServerApps not dropped to --run-as", "fedrac/deploy/superlink.py",
     "return [*RunAs(\"\", uid, gid).setpriv(), ", "return [", ["tests/test_deploy_run_as.py"]),
    ("missing run-as user silently root", "fedrac/deploy/runas.py",
     "        if not create:\n            raise RunAsError(",
     "        if not create:\n            return None\n            raise RunAsError(",
     ["tests/test_deploy_run_as.py"]),
    ("corrupt image not named", "fedrac/data/sources.py",
     "    images = _decoded(ds, column)", "    images = ds[column]",
     ["tests/test_bad_data.py"]),
    ("tune picks the worst lr", "fedrac/tune.py",
     'return max(ok, key=lambda p: (sign * p["score"], -p["lr"]))',
     'return min(ok, key=lambda p: (sign * p["score"], -p["lr"]))', ["tests/test_tune.py"]),
    ("tune stops at the grid's edge", "fedrac/tune.py",
     'for i in range(int(t.get("extend", 0))):', 'for i in range(0):', ["tests/test_tune.py"]),
    ("tune steps back inside the grid at its top", "fedrac/tune.py",
     "return lrs[-1] * (lrs[-1] / lrs[-2])", "return lrs[-1] * (lrs[-2] / lrs[-1])",
     ["tests/test_tune.py"]),
    ("a resumed tuned run is tuned again", "fedrac/tune.py",
     'if t.get("name", "none") == "none" or t.get("result"):',
     'if t.get("name", "none") == "none":', ["tests/test_tune.py"]),
    ("tune trials scored on the test split", "fedrac/tune.py",
     'trial["dataset"][KEY] = {', 'trial["dataset"]["unused"] = {', ["tests/test_tune.py"]),
    ("tune trials at the job's seed", "fedrac/tune.py",
     'trial.update(seed=int(t.get("seed", 0)),', 'trial.update(seed=int(d["seed"]),',
     ["tests/test_tune.py"]),
    ("tune cache never read", "fedrac/tune.py",
     "    if path.is_file():\n        try:", "    if False:\n        try:",
     ["tests/test_tune.py"]),
    ("tune: a failing grid point is fatal", "fedrac/tune.py",
     "except Exception as err:  # noqa: BLE001 - a failing grid point ends no job",
     "except ZeroDivisionError as err:  # noqa: BLE001", ["tests/test_tune.py"]),
    ("tune accepts an empty grid", "fedrac/tune.py",
     "or not grid or not all(", "or not all(", ["tests/test_tune.py"]),
    ("validation split carved from the test rows", "fedrac/data/holdout.py",
     "    train = splits.target_train\n", "    train = splits.target_test\n",
     ["tests/test_tune.py"]),
    ("Fed-SB R average unweighted", "strategies/fed_sb.py",
     "avg = self.average(server_round, valid)  # R starts",
     "avg = __import__('strategies.base').base.weighted_average([r.tensors for r in valid], "
     "[1.0] * len(valid))  # R starts", FEDSB),
    ("Fed-SB merge transposes B and A", "fedrac/wire/delta_sync.py",
     'frame[f"{name}.lora_A"].to(torch.float64), br, scale)',
     'br.T, frame[f"{name}.lora_A"].to(torch.float64).T, scale)', FEDSB),
    ("Fed-SB init sign flipped", "fedrac/adapters/lora_sb.py",
     "m = -float(step) * torch.sign(", "m = float(step) * torch.sign(", FEDSB),
    ("Fed-SB init R_0 ignores the scale", "strategies/fed_sb.py",
     "torch.diag(s.to(torch.float64)) / scale",
     "torch.diag(s.to(torch.float64))", FEDSB),
    ("Fed-SB one init client uploads its full gradient", "strategies/fed_sb.py",
     "low_rank = len(chosen) == 1", "low_rank = False", FEDSB),
    ("Fed-SB client's init SVD ignores the step", "clients/fed_sb.py",
     "float(config[INIT_STEP_KEY])", "1.0", FEDSB),
    ("Fed-SB sends B, A every round", "strategies/fed_sb.py",
     "self.holders.update(nodes)", "pass", FEDSB),
    ("Fed-SB delta leaves out the trained modules", "strategies/fed_sb.py",
     "**avg, **{SET_PREFIX + k: state[k] for k in self.module_shapes}}", "**avg}",
     FEDSB_DELTA),
    ("Fed-SB delta replays R unscaled", "fedrac/wire/delta_sync.py",
     "middles, alpha / rank)", "middles, alpha)", FEDSB_DELTA),
    ("Fed-SB resync sends no B, A", "strategies/fed_sb.py",
     '"adapters": to_array_record(self.frame)})', '})', FEDSB_DELTA),
    ("Fed-SB delta download never used", "strategies/fed_sb.py",
     "        if self.sync is not None:  # download=delta: per node",
     "        if False:  # download=delta: per node", FEDSB_DELTA),
    ("middle factor R left off the path", "fedrac/adapters/layer.py",
     "return self.lora_A if self.lora_R is None else self.lora_R @ self.lora_A",
     "return self.lora_A", FEDSB),

    ("the server builds its model through clients/", "fedrac/server/app.py",
     "from fedrac.models.shared import config_model, module_keys\n",
     "from clients.handlers import client_model as config_model\n"
     "from clients.handlers import module_keys\n", ["tests/test_architecture.py"]),
    ("privacy imports the whole config check (a circle)", "fedrac/privacy/dp.py",
     "from fedrac.settings.errors import ConfigError\n",
     "from fedrac.settings.config import ConfigError\n", ["tests/test_architecture.py"]),
    ("the import graph misses function-level imports", "tests/test_architecture.py",
     "        for child in ast.iter_child_nodes(node):\n            visit(child)\n\n    visit(",
     "        for child in getattr(node, 'body', []) if isinstance(node, ast.Module) else []:\n"
     "            visit(child)\n\n    visit(", ["tests/test_architecture.py"]),
    ("typed settings: eval_every from num_rounds", "fedrac/settings/typed.py",
     'eval_every=int(cfg["eval_every"])', 'eval_every=int(cfg["num_rounds"])',
     ["tests/test_settings.py"]),
    ("typed settings: monitor.top_k ignored", "fedrac/settings/typed.py",
     'top_k=int(mon.get("top_k", 8))', "top_k=8", ["tests/test_settings.py"]),
    ("typed settings: the tune group dropped", "fedrac/settings/typed.py",
     'tune=cfg.get("tune") or {}', "tune={}", ["tests/test_settings.py"]),
    ("typed privacy: the clients and the rounds swapped", "fedrac/privacy/dp.py",
     "_resolve(settings.privacy.privacy, run.num_clients, run.num_rounds,",
     "_resolve(settings.privacy.privacy, run.num_rounds, run.num_clients,",
     ["tests/test_privacy.py"]),
]


def run(index: int, root: Path) -> bool:
    """Apply mutant ``index`` in the copy ``root``, run its tests, restore; True when a test
    failed (killed)."""
    name, rel, old, new, tests = MUTANTS[index]
    path = root / rel
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"mutant {index} ({name}): snippet found {original.count(old)} times "
                         f"in {rel}; update the mutant")
    try:
        path.write_text(original.replace(old, new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "-m", "not slow", *tests], cwd=root, capture_output=True,
                              text=True)
    finally:
        path.write_text(original)
    return proc.returncode != 0


def main(argv: list[str]) -> int:
    """Run the chosen (default: all) mutants and print the kill count."""
    chosen = [int(a) for a in argv] or list(range(len(MUTANTS)))
    root = Path(tempfile.mkdtemp(prefix="fedrac-mutants-")) / "repo"
    shutil.copytree(ROOT, root, ignore=IGNORE)
    where = subprocess.run([sys.executable, "-c", "import fedrac; print(fedrac.__file__)"],
                           cwd=root, capture_output=True, text=True, check=True).stdout
    if not where.strip().startswith(str(root)):
        raise SystemExit(f"the copy's fedrac is not the one imported ({where.strip()})")
    killed = 0
    for i in chosen:
        start = time.perf_counter()
        dead = run(i, root)
        killed += dead
        print(f"{i:2d} {'killed  ' if dead else 'SURVIVED'} {time.perf_counter() - start:6.1f}s"
              f"  {MUTANTS[i][0]} ({MUTANTS[i][1]})", flush=True)
    print(f"{killed} of {len(chosen)} mutants killed")
    shutil.rmtree(root.parent, ignore_errors=True)
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
