"""What every benchmark part shares: config composition, workload data, timing."""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fedrac.data import load_splits, partition, to_tensors
from fedrac.engines.inline import InlineGrid
from fedrac.models import build_model
from fedrac.models.pretrain import pretrained_state
from fedrac.settings.config import conf_dir, validate
from fedrac.training.local import TrainSettings


def compose_cfg(*overrides: str) -> dict[str, Any]:
    """The validated run config for ``overrides`` (as the CLI composes it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base=None):
        return validate(compose("config", overrides=list(overrides)))


def settings_of(cfg: dict[str, Any]) -> TrainSettings:
    """The local training settings of the run config's ``client`` group."""
    c = cfg["client"]
    return TrainSettings(optimizer=c["optimizer"], lr=float(c["lr"]),
                         local_epochs=int(c["local_epochs"]), local_steps=c["local_steps"],
                         batch_size=int(c["batch_size"]), weight_decay=float(c["weight_decay"]),
                         momentum=float(c["momentum"]))


class Workload:
    """Model, pretrained weights, client partitions and test data of one run config."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        task = load_splits(cfg["dataset"])
        self.model = build_model(cfg["model"], task.input_shape, task.num_classes)
        self.state = pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"],
                                      cfg["cache_dir"])
        self.model.load_state_dict(self.state)
        n = int(cfg["num_clients"])
        self.data = [to_tensors(partition(cfg["dataset"], cfg["partitioner"], n, i,
                                          int(cfg["seed"]))) for i in range(n)]
        self.test = to_tensors(task.target_test)
        # the inline engine's node ids, so a loop can visit clients in the same order
        self.node_ids = InlineGrid(None, n).get_node_ids()  # type: ignore[arg-type]

    def with_cfg(self, cfg: dict[str, Any]) -> Workload:
        """This workload's model and data under another config of the same data (e.g. fewer
        rounds)."""
        other = copy.copy(self)
        other.cfg = cfg
        return other


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls of ``fn`` (output silenced) and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class Paired(NamedTuple):
    """Paired timings: medians, the median and range of the pairs' ratios, last results."""

    seconds: float
    floor: float
    ratio: float
    ratio_min: float
    ratio_max: float
    result: Any
    floor_result: Any

    def row(self, what: str, **extra: Any) -> dict[str, Any]:
        """A results row: ``what``, the timings and ``extra``."""
        return {"what": what, "seconds": self.seconds, "floor": self.floor,
                "ratio": self.ratio, "ratio_min": self.ratio_min, "ratio_max": self.ratio_max,
                **extra}


def timed_pair(fn: Callable[[], Any], floor: Callable[[], Any], repeats: int) -> Paired:
    """``fn`` and ``floor`` run back to back ``repeats`` times (so both see the same load)."""
    pairs, res_fn, res_floor = [], None, None
    for _ in range(repeats):
        t_fn, res_fn = timed(fn, 1)
        t_floor, res_floor = timed(floor, 1)
        pairs.append((t_fn, t_floor))
    ratios = [p[0] / p[1] for p in pairs]
    return Paired(statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
                  statistics.median(ratios), min(ratios), max(ratios), res_fn, res_floor)


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
