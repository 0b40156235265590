"""``fedrac [overrides]``: compose the Hydra config, validate it, run, print the table."""

from __future__ import annotations

import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedrac.config import ConfigError, check_group_overrides, conf_dir, expand_paths, validate
from fedrac.results import format_table


def _fail(err: Exception) -> None:
    print(f"fedrac: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float:
    try:
        run_cfg = validate(cfg)
    except ConfigError as err:
        _fail(err)
    if run_cfg.get("resume"):  # the saved config, with the few overrides that keep its path
        from fedrac.checkpoint import resume_config

        try:
            run_cfg = resume_config(run_cfg["resume"], HydraConfig.get().overrides.task, run_cfg)
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
    from fedrac.run import run_experiment

    summary = run_experiment(run_cfg)
    if summary.get("interrupted"):
        from fedrac.checkpoint import exit_interrupted

        exit_interrupted(summary, run_cfg["output_dir"])
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
