"""``fedrac [overrides]``: compose the Hydra config, validate it, run, print the table."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fedrac.config import ConfigError, check_group_overrides, conf_dir, expand_paths, validate
from fedrac.results import format_table


def _fail(err: Exception) -> None:
    print(f"fedrac: error: {err}", file=sys.stderr, flush=True)
    _drop_empty_run_dir()
    sys.exit(2)


def _drop_empty_run_dir() -> None:
    """A failed start leaves no output folder: Hydra's job folder goes if it holds only Hydra's
    own files (``.hydra/``, the log), and its date folder if that is then empty."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra", f"{hc.job.name}.log"}:
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):
            out.parent.rmdir()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float:
    try:
        run_cfg = validate(cfg)
    except ConfigError as err:
        _fail(err)
    if run_cfg.get("output_dir") is None:
        run_cfg["output_dir"] = HydraConfig.get().runtime.output_dir
    if run_cfg.get("runner"):  # an experiment with its own loop, e.g. fedrac.experiments.quadratic
        from hydra.utils import get_method

        from fedrac.run import quiet_flower

        quiet_flower(bool(run_cfg.get("verbose", False)))
        try:
            summary = get_method(run_cfg["runner"])(run_cfg)
        except ConfigError as err:
            _fail(err)
        return float(summary.get("final_accuracy", summary.get("final_distance", math.nan)))
    from fedrac.experiments.dedup import earlier_job, reuse
    from fedrac.run import run_experiment

    hc = HydraConfig.get()
    same = earlier_job(run_cfg, hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    if same is not None:  # a sweep runs each distinct job once
        print(f"fedrac: same run as {same} (only keys it ignores differ): results copied")
        summary = reuse(same, run_cfg["output_dir"])
    else:
        summary = run_experiment(run_cfg)
    print(format_table([summary]), flush=True)
    return float(summary["final_accuracy"])


def main() -> None:
    """Console entry point (``fedrac`` and ``python -m fedrac``)."""
    sys.argv[1:] = expand_paths(sys.argv[1:])
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    _hydra_main()
