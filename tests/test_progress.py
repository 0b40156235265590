"""Progress: a tqdm bar (round, accuracy, ETA) on a terminal, one line per round otherwise."""

from __future__ import annotations

import sys

import pytest

from fedrac.run import run_experiment
from fedrac.settings.config import ConfigError
from tests.helpers import run_config


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_on_a_terminal_lines_otherwise(tmp_path, capsys, monkeypatch, tty):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    run_experiment(run_config(tmp_path, "num_rounds=3"))
    out = capsys.readouterr().out
    if tty:  # a tqdm bar: round count, accuracy, elapsed<remaining (the ETA)
        assert "3/3" in out and "acc " in out and "<00:" in out and "\r" in out
        assert "[round 1/3]" not in out and out.count("[round 3/3]") == 1  # final line kept
    else:
        assert all(f"[round {r}/3] acc" in out for r in range(4)) and "\r" not in out


def test_progress_lines_can_be_forced_and_bad_values_are_refused(tmp_path):
    assert run_config(tmp_path, "progress=lines")["progress"] == "lines"
    with pytest.raises(ConfigError, match=r"^progress='spinner' is not allowed; allowed: auto"):
        run_config(tmp_path, "progress=spinner")
