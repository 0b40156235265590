"""Checkpoints and resume: one atomic file holding everything a resumed run needs.

``<output_dir>/checkpoint/state.safetensors`` holds the tensors (global weights, the
strategy's factors and delta history, node contexts as Flower protobuf bytes, torch's RNG
state); its metadata entry ``fedrac`` is a JSON document with everything else (round,
ledger, metrics rows, strategy scalars, Python/NumPy RNG states), where each tensor appears
as ``{"__tensor__": "<key>"}``. Nothing is pickled. The file is written to a temporary name,
fsynced and moved into place with ``os.replace``, so a crash leaves the previous checkpoint.
``checkpoint/config.json`` is the run's validated config: ``fedrac resume=<dir>`` reads it.

Round seeds, client sampling and local batch order all derive from ``(run seed, round)``,
so restoring this state before round ``t + 1`` continues the very same trajectory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedrac.atomic import atomic_path
from fedrac.settings.errors import _require
from fedrac.settings.typed import Settings

FOLDER = "checkpoint"
STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.json"
FORMAT = 1
_TENSOR = "__tensor__"
_BYTES = "__bytes__"
_TUPLE = "__tuple__"

# Overrides a resumed run accepts: they cannot change its trajectory (num_rounds only upwards).
RESUMABLE = ("resume", "num_rounds", "checkpoint_every", "progress", "verbose", "logger",
             "output_dir", "cache_dir")


# ------------------------------------------------------------ tensors <-> JSON tree
_SCALARS = (type(None), bool, int, float, str)


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able values; tensors and bytes move into ``tensors`` under ``path``."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind is list and all(type(v) in _SCALARS for v in obj):  # fast paths: rows, RNG
        return list(obj)
    if kind is dict and all(type(v) in _SCALARS for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    if kind is tuple and all(type(v) in _SCALARS for v in obj):
        return {_TUPLE: list(obj)}
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {_TENSOR: path}
    if isinstance(obj, bytes | bytearray):
        tensors[path] = (torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj
                         else torch.empty(0, dtype=torch.uint8))
        return {_BYTES: path}
    if isinstance(obj, np.ndarray):
        return _flatten(torch.from_numpy(np.ascontiguousarray(obj)), path, tensors)
    if isinstance(obj, Mapping):
        return {str(k): _flatten(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path}")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_BYTES}:
            return tensors[obj[_BYTES]].numpy().tobytes()
        if set(obj) == {_TUPLE}:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, none sharing memory with another (safetensors refuses that)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# ---------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The global Python, NumPy and torch (CPU, and CUDA when present) RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.int64).astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ----------------------------------------------------------------- files, atomically
def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync, then move the file to ``path`` (never half-written)."""
    with atomic_path(path) as tmp:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def config_hash(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the run's config as saved (JSON), without what a resume may change
    (:data:`RESUMABLE`): ties a checkpoint to its run."""
    plain = json.loads(json.dumps(dict(cfg), default=str))
    kept = {k: v for k, v in plain.items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _digest(text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state's JSON tree and every tensor's key, dtype, shape and bytes."""
    h = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(output_dir: str | Path, state: Mapping[str, Any],
                    run_hash: str | None = None) -> float:
    """Write ``state`` (a tree of JSON values, tensors and bytes) atomically with its
    checksum and ``run_hash`` (:func:`config_hash`); the seconds."""
    t0 = time.perf_counter()
    folder = Path(output_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(dict(state), "", tensors)
    tensors = _unshared(tensors)
    text = json.dumps({"format": FORMAT, "state": tree})
    meta = {"fedrac": text, "sha256": _digest(text, tensors), "run": run_hash or ""}
    _atomic_write(folder / STATE_FILE,
                  lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return time.perf_counter() - t0


def remove_orphans(folder: Path) -> list[str]:
    """Remove the temporary files a crash left in the checkpoint folder (``.<name>.*.tmp*``,
    see :func:`fedrac.atomic.atomic_path`); the run holds the folder (its lock), so no other
    writer owns them. Returns their names."""
    gone = []
    for name in (STATE_FILE, CONFIG_FILE):
        for p in folder.glob(f".{name}.*.tmp*"):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def checkpoint_path(output_dir: str | Path) -> Path:
    """Where the checkpoint of the run in ``output_dir`` lives."""
    return Path(output_dir) / FOLDER / STATE_FILE


def load_checkpoint(output_dir: str | Path, run_hash: str | None = None) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote; ``ConfigError`` (one line) when there is none,
    when it is damaged (unreadable, checksum mismatch) or, given ``run_hash``, when it was
    written by another run (another config)."""
    path = checkpoint_path(output_dir)
    _require(path.is_file(), "resume", str(output_dir),
             f"a run folder holding {FOLDER}/{STATE_FILE} (none there: the run stopped before "
             "its first checkpoint, or ran with checkpoint_every=0)")
    where = f"{FOLDER}/{STATE_FILE}"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        text = meta["fedrac"]
        doc = json.loads(text)
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - truncated, flipped header bytes, not safetensors
        why = str(err).splitlines()[0][:120] if str(err) else ""
        _require(False, "resume", str(output_dir), f"a run folder with an intact {where} (it "
                 f"is damaged: {type(err).__name__}{': ' + why if why else ''})")
    _require(bool(meta.get("sha256")), "resume", str(output_dir),
             f"a run folder with a checksummed {where} (this one has no checksum: written by "
             "an older fedrac or not by fedrac)")
    _require(_digest(text, tensors) == meta["sha256"], "resume", str(output_dir),
             f"a run folder with an intact {where} (its checksum does not match: damaged)")
    if run_hash is not None:
        _require(meta.get("run") == run_hash, "resume", str(output_dir),
                 f"a folder whose {where} belongs to its run (this one was written by another "
                 f"run: config hash {str(meta.get('run'))[:12]}, the run's {run_hash[:12]})")
    return _unflatten(doc["state"], tensors)


def save_run_config(output_dir: str | Path, cfg: Mapping[str, Any]) -> None:
    """Keep the run's validated config beside its checkpoint (read by ``resume=``)."""
    folder = Path(output_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(cfg), indent=1, default=str)
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def _override_key(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.lstrip("+~"), value


_MISSING = object()


def _dotted(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg["a"]["b"]`` for ``key="a.b"`` (``_MISSING`` when absent)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def resume_config(output_dir: str | Path, overrides: Sequence[str],
                  given: Mapping[str, Any]) -> dict[str, Any]:
    """The saved config of the run in ``output_dir`` with the few overrides a resumed run
    accepts (:data:`RESUMABLE`) taken from ``given`` (the composed command-line config);
    any other override is a ``ConfigError``."""
    folder = Path(output_dir)
    path = folder / FOLDER / CONFIG_FILE
    _require(path.is_file(), "resume", str(output_dir),
             f"the output folder of a fedrac run (with {FOLDER}/{CONFIG_FILE}: written when "
             "checkpoint_every >= 1 and secagg=none)")
    cfg = json.loads(path.read_text())
    allowed = "num_rounds (upwards), checkpoint_every, progress, verbose, logger, cache_dir"
    for item in overrides:
        key, value = _override_key(item)
        top = key.split(".")[0]
        if isinstance(_dotted(cfg, key), Mapping) and "name" in _dotted(cfg, key):
            key = f"{key}.name"  # a group option: the same option as the run's
        same = given and _dotted(given, key) == _dotted(cfg, key) != _MISSING
        _require(top in RESUMABLE or same, key, value,
                 f"with resume= the saved config is used; only {allowed} may be given "
                 "(or a value the run already had)")
    for item in overrides:
        key, value = _override_key(item)
        top = key.split(".")[0]
        if top == "output_dir":
            _require(Path(str(given["output_dir"])).resolve() == folder.resolve(),
                     "output_dir", value, f"the resumed folder {folder} (or leave it out)")
        elif top == "num_rounds":
            n = given["num_rounds"]
            _require(isinstance(n, int) and n >= int(cfg["num_rounds"]), "num_rounds", n,
                     f"an integer >= {cfg['num_rounds']} (the saved run's) with resume=")
            privacy = (cfg.get("privacy") or {}).get("name", "none")
            _require(privacy == "none" or n == int(cfg["num_rounds"]), "num_rounds", n,
                     f"{cfg['num_rounds']} with resume= and privacy={privacy} (the noise is "
                     "calibrated to the number of rounds)")
            cfg["num_rounds"] = n
        elif top != "resume":
            cfg[top] = given.get(top)
    cfg["resume"] = str(folder)
    cfg["output_dir"] = str(folder)
    return cfg


def check_same_run(saved: Mapping[str, Any], given: Mapping[str, Any], path: str = "") -> None:
    """``ConfigError`` naming the first value in which ``given`` differs from the resumed run's
    ``saved`` config (outside :data:`RESUMABLE`): under ``flwr run`` the nodes compose their
    config from the same overrides, so these must be the run's own."""
    for key in sorted(set(saved) | set(given)):
        name = f"{path}{key}"
        if not path and key in (*RESUMABLE, "min_available_clients"):
            continue
        a, b = saved.get(key, _MISSING), given.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            check_same_run(a, b, f"{name}.")
        else:
            _require(a == b, name, None if b is _MISSING else b,
                     f"{None if a is _MISSING else a!r}, the resumed run's value (with resume= "
                     "under flwr run give the run's own overrides)")


# ------------------------------------------------------------------- stop on signal
class RunInterrupted(Exception):  # noqa: N818 - a stop request, not an error
    """Raised after the checkpoint of the round in which SIGINT/SIGTERM arrived."""

    def __init__(self, server_round: int, signum: int) -> None:
        super().__init__(f"interrupted after round {server_round}")
        self.server_round, self.signum = server_round, signum


class StopRequest:
    """Set by SIGINT/SIGTERM: the run finishes its round, checkpoints and stops."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    def clear(self) -> None:
        self.signum = 0
        self.event.clear()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


STOP = StopRequest()


@contextmanager
def stop_on_signals(output_dir: str | Path) -> Iterator[StopRequest]:
    """Inside the block SIGINT/SIGTERM ask the run to stop after the current round (a second
    signal stops at once, leaving the last checkpoint). Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return

    def handler(signum: int, frame: Any) -> None:
        if STOP.requested:
            print(f"fedrac: stopped at once; continue from the last checkpoint with: "
                  f"fedrac resume={output_dir}", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        STOP.set(signum)

    STOP.clear()
    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield STOP
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# -------------------------------------------------------------- the server's side
class Checkpointer:
    """Writes a run's checkpoint every ``checkpoint_every`` rounds (and after the last one,
    and when a stop was requested) from the server's parts, and restores them on resume.

    ``strategy``, ``recorder`` and ``grid`` are anything with ``state_dict()`` /
    ``load_state_dict()`` (a grid without them -- Ray's, deployment's -- is left out: its
    nodes keep no state fedrac needs, except delta-sync caches, which then resync).
    """

    def __init__(self, settings: Settings, strategy: Any, recorder: Any, grid: Any,
                 monitor: Any = None) -> None:
        cfg, run = settings.config, settings.run  # the config itself: hashed and saved
        self.dir = Path(run.output_dir)
        self.monitor = monitor  # the spectrum monitor (spectrum.csv), when it keeps state
        self.every = run.checkpoint_every
        self.num_rounds = run.num_rounds
        self.strategy, self.recorder, self.grid = strategy, recorder, grid
        self.seconds: list[float] = []  # each checkpoint's cost (a file holds its forerunners')
        self.count = 0
        self.run_hash = config_hash(cfg)
        remove_orphans(self.dir / FOLDER)
        if self.every:
            save_run_config(self.dir, cfg)

    def due(self, server_round: int) -> bool:
        """Whether round ``server_round`` ends with a checkpoint."""
        return bool(self.every) and server_round > 0 and (
            server_round % self.every == 0 or server_round == self.num_rounds
            or STOP.requested)

    def state(self, server_round: int, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Everything a resumed run needs after round ``server_round``."""
        state = {"round": server_round, "weights": dict(weights),
                 "strategy": self.strategy.state_dict(), "recorder": self.recorder.state_dict(),
                 "rng": rng_state(), "checkpoint_seconds": list(self.seconds),
                 "checkpoints": self.count + 1}
        if hasattr(self.grid, "state_dict"):
            state["grid"] = self.grid.state_dict()
        if hasattr(self.monitor, "state_dict"):
            state["monitor"] = self.monitor.state_dict()
        return state

    def after_round(self, server_round: int, weights: Any) -> None:
        """Checkpoint when due (``weights``: a state dict, or a callable giving one); then
        raise :class:`RunInterrupted` if a signal asked the run to stop."""
        if self.due(server_round):
            t0 = time.perf_counter()
            state = self.state(server_round, weights() if callable(weights) else weights)
            save_checkpoint(self.dir, state, self.run_hash)
            self.seconds.append(time.perf_counter() - t0)
            self.count += 1
        if STOP.requested and 0 < server_round < self.num_rounds:
            raise RunInterrupted(server_round, STOP.signum)

    def restore(self) -> tuple[int, dict[str, torch.Tensor], Mapping[str, Any]]:
        """Load the checkpoint into the strategy, recorder and grid; return the round it was
        taken after, its global weights and the RNG states (to set just before the loop)."""
        state = load_checkpoint(self.dir, self.run_hash)
        self.strategy.load_state_dict(state["strategy"])
        self.recorder.load_state_dict(state["recorder"])
        if "grid" in state and hasattr(self.grid, "load_state_dict"):
            self.grid.load_state_dict(state["grid"])
        if "monitor" in state and hasattr(self.monitor, "load_state_dict"):
            self.monitor.load_state_dict(state["monitor"])
        self.seconds = [float(s) for s in state.get("checkpoint_seconds", [])]
        self.count = int(state.get("checkpoints", len(self.seconds)))
        return int(state["round"]), dict(state["weights"]), state["rng"]

    def summary(self) -> dict[str, Any]:
        """``checkpoints`` written (over the whole run), their total and mean cost in seconds
        (of those whose cost is known: a checkpoint cannot hold its own)."""
        n = len(self.seconds)
        mean = sum(self.seconds) / n if n else 0.0
        return {"checkpoints": self.count, "checkpoint_seconds": mean * self.count,
                "checkpoint_seconds_each": mean}


def exit_interrupted(summary: Mapping[str, Any], output_dir: str | Path) -> None:
    """Print the one line saying how to continue an interrupted run; exit 128 + signal."""
    import shlex

    if not summary.get("checkpoints"):  # secagg=plus (or checkpoint_every=0) keeps none
        print(f"fedrac: interrupted after round {summary['interrupted_after_round']}; results "
              f"so far in {output_dir}; no checkpoint to continue from", flush=True)
        sys.exit(128 + int(signal.Signals[summary["signal"]]))
    print(f"fedrac: interrupted after round {summary['interrupted_after_round']}; results so "
          f"far in {output_dir}; continue with: fedrac resume={shlex.quote(str(output_dir))}",
          flush=True)
    sys.exit(128 + int(signal.Signals[summary["signal"]]))
