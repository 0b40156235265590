"""``flwr_datasets`` without its plotting helpers until something uses them.

``import flwr_datasets`` (any partitioner) imports ``flwr_datasets.visualization``, which
imports seaborn and scipy.stats: 1.9-3.1 s of every run's start-up on this project's 2-core
machine, for plots fedrac never draws. Importing this module (``fedrac.data`` does, before
anything else) puts a stand-in module in its place; the first use of any of its names
imports the real module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

PLOTS = "flwr_datasets.visualization"


class _Deferred(types.ModuleType):
    """A module that imports the real one (and becomes it) on first use of one of its names.

    Dunder lookups (``__file__``, ``__wrapped__``, ... that tools scanning ``sys.modules``
    make) do not count as use; ``__path__`` is the real package's, so its submodules import.
    """

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        parent = sys.modules.get(self.__name__.rpartition(".")[0])
        if parent is not None:
            setattr(parent, self.__name__.rpartition(".")[2], real)
        return getattr(real, attr)


def defer_flwr_datasets_plots() -> None:
    """Install the stand-in unless ``flwr_datasets`` is imported already (or absent)."""
    if "flwr_datasets" in sys.modules or PLOTS in sys.modules:
        return
    spec = importlib.util.find_spec("flwr_datasets")  # top level: finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return
    stand_in = _Deferred(PLOTS)
    stand_in.__path__ = [os.path.join(spec.submodule_search_locations[0], "visualization")]
    sys.modules[PLOTS] = stand_in


defer_flwr_datasets_plots()
