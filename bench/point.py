"""One scale point in a fresh process: ``python -m bench.point OVERRIDE...`` prints JSON.

Peak resident memory is per process and never goes down, so each point gets its own
process.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time

from bench.common import compose_cfg
from fedrac.run import run_experiment


def measure(overrides: list[str]) -> dict:
    """Run fedrac with ``overrides``; seconds per round and this process's peak RSS (MiB)."""
    cfg = compose_cfg(*overrides)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_experiment(cfg)
    return {"seconds": time.perf_counter() - start,
            "seconds_per_round": summary["seconds_per_round"],
            "client_seconds_per_round": summary["client_seconds_per_round"],
            "final_accuracy": summary["final_accuracy"],
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``VmHWM``; reset by ``exec``, unlike
    ``ru_maxrss``, which a child inherits from the process that forked it)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1:])))
