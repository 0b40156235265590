"""``fedrac [overrides]``: compose the Hydra config, validate it, run, print the table.

Exit codes: 0 done, 2 a config error (one line, before any work; Hydra's own errors
included), 3 the run produced no result (no round had a valid reply), 1 a sweep with a
failed job (each recorded in the comparison).
"""

from __future__ import annotations

import errno
import math
import os
import sys
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fedrac.server.results import format_table
from fedrac.settings.config import (
    ConfigError,
    check_added_keys,
    check_group_overrides,
    conf_dir,
    expand_paths,
    validate,
)


def _fail(err: Exception | str, code: int = 2, in_job: bool = False) -> NoReturn:
    print(f"fedrac: error: {err}", file=sys.stderr, flush=True)
    if in_job:  # a run that never started leaves no empty folder
        from fedrac.server.outputs import drop_if_unused

        drop_if_unused(HydraConfig.get().runtime.output_dir)
    sys.exit(code)


def _prepare(cfg: DictConfig) -> dict[str, Any]:
    """The validated run config with its output folder (ConfigError when either is bad)."""
    from fedrac.server.outputs import (
        check_output_dir,
        claim_output_dir,
        clear_results,
        job_output_dir,
    )

    run_cfg = validate(cfg)
    if run_cfg.get("resume"):  # the saved config, with the few overrides that keep its path
        from fedrac.server.checkpoint import resume_config

        run_cfg = resume_config(run_cfg["resume"], HydraConfig.get().overrides.task, run_cfg)
    run_cfg["output_dir"] = job_output_dir(run_cfg.get("output_dir"), HydraConfig.get())
    claim_output_dir(run_cfg["output_dir"])  # first: one run per folder, then its contents
    check_output_dir(run_cfg)
    if run_cfg.get("overwrite") and not run_cfg.get("resume"):
        clear_results(run_cfg["output_dir"])
    return run_cfg


def _run(run_cfg: dict[str, Any]) -> float:
    if run_cfg.get("runner"):  # an experiment with its own loop, e.g. fedrac.experiments.quadratic
        from hydra.utils import get_method

        from fedrac.run import quiet_flower

        quiet_flower(bool(run_cfg.get("verbose", False)))
        summary = get_method(run_cfg["runner"])(run_cfg)
        return float(summary.get("final_accuracy", summary.get("final_distance", math.nan)))
    from fedrac.run import run_experiment
    from fedrac.tune import tune_lr

    summary = run_experiment(tune_lr(run_cfg))  # tune=lr: at the lr chosen on validation
    if summary.get("interrupted"):
        from fedrac.server.checkpoint import exit_interrupted

        exit_interrupted(summary, run_cfg["output_dir"])
    print(format_table([summary]), flush=True)
    return float(summary["final_accuracy"])


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float:
    from fedrac.run import RunFailedError

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from fedrac.settings.sweep import run_job

        return run_job(cfg, _prepare, _run)
    try:
        run_cfg = _prepare(cfg)
    except ConfigError as err:
        _fail(err, in_job=True)
    try:
        return _run(run_cfg)
    except ConfigError as err:
        _fail(err)
    except RunFailedError as err:  # no round had a valid reply: exit 3, one line
        _fail(err, 3)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        _fail(f"no space left on the device writing {err.filename or run_cfg['output_dir']}; "
              "the files already written are intact (each is written whole or not at all): "
              f"free space, then continue with resume={run_cfg['output_dir']}", 1)


def main() -> None:
    """Console entry point (``fedrac`` and ``python -m fedrac``)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedrac.settings.hydra_errors import one_line

    sys.argv[1:] = expand_paths(sys.argv[1:])
    try:
        check_group_overrides(sys.argv[1:])
        check_added_keys(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    given = os.environ.get("HYDRA_FULL_ERROR")
    full = given == "1"  # Hydra's full traceback asked for; 0 or unset: fedrac's one line
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach us, not its printer
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        if full:
            raise
        _fail(one_line(err, sys.argv[1:]))
    finally:
        if given is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = given
    from fedrac.settings.sweep import failed_jobs

    failed = failed_jobs()
    if failed:
        _fail(f"{len(failed)} job{'s' * (len(failed) != 1)} of the sweep failed: "
              + "; ".join(failed), 1)
