"""Shared test helpers: run a strategy for some rounds over in-process Flower nodes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrac.engines.inline import run_inline


def run_config(tmp_path, *overrides: str) -> dict:
    """The validated config of an inline run with ``overrides``, writing into ``tmp_path``."""
    from hydra import compose, initialize_config_dir

    from fedrac.settings.config import conf_dir, validate

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = validate(compose("config", overrides=["engine=inline", *overrides]))
    cfg["output_dir"], cfg["cache_dir"] = str(tmp_path / "out"), str(tmp_path / "cache")
    return cfg


_DEFAULT: dict = {}


def settings_with(**sections):
    """Typed settings (:func:`fedrac.settings.typed.settings_of`) of the default config with
    the top-level keys ``sections`` replaced (a group's whole section). Not validated: for the
    internals that take the settings, fed the keys a test sets."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedrac.settings.config import conf_dir
    from fedrac.settings.typed import settings_of

    if not _DEFAULT:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            _DEFAULT.update(OmegaConf.to_container(compose("config"), resolve=True))
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in _DEFAULT.items()}
    return settings_of({**cfg, **sections})


def client_settings(**given):
    """:class:`ClientSettings` with the ``client.*`` keys ``given``, the rest ``None`` (unset,
    as in a ``client`` mapping without them: nothing sent for them)."""
    import dataclasses

    from fedrac.settings.typed import ClientSettings

    return ClientSettings(**{f.name: given.get(f.name) for f in dataclasses.fields(
        ClientSettings)})


def cli_error(args: list[str], tmp_path, monkeypatch, capsys) -> list[str]:
    """Run the ``fedrac`` CLI in-process with ``args`` writing into ``tmp_path``; assert it
    stopped with exit code 2, wrote no output folder; return its stderr lines."""
    import sys

    import pytest

    from fedrac import cli

    out = tmp_path / "run"
    monkeypatch.setenv("FEDRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["fedrac", *args, f"output_dir={out}",
                                      f"hydra.run.dir={tmp_path / 'hydra'}"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err.strip().splitlines()


def run_strategy(strategy, initial: ArrayRecord, num_rounds: int, num_nodes: int,
                 train: Callable[[Message, Context], Message] | ClientApp) -> list[ArrayRecord]:
    """Run ``strategy`` with a ClientApp whose train handler is ``train`` (or that ClientApp).

    Returns the global arrays after each round (index 0: the initial ones).
    """
    seen: list[ArrayRecord] = []
    if isinstance(train, ClientApp):
        client = train
    else:
        client = ClientApp()
        client.train()(train)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid, initial, num_rounds=num_rounds,
                       evaluate_fn=lambda rnd, arrays: seen.append(arrays))

    run_inline(server, client, num_nodes)
    return seen


def reply(msg: Message, key: str, tensors: dict, num_examples: int, loss: float = 0.0) -> Message:
    """A train reply carrying ``tensors`` under ``key`` and the usual metrics."""
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": loss,
                            "train-seconds": 0.0, **echo(msg)})
    arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in tensors.items()})
    return Message(RecordDict({key: arrays, "metrics": metrics}), reply_to=msg)


def echo(msg: Message) -> dict[str, int]:
    """The round and nonce a train reply echoes from the message it answers."""
    config = msg.content.config_records.get("config")
    return {k: int(config[k]) for k in ("server-round", "round-nonce")
            if config is not None and k in config}
