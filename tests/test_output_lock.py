"""An output folder is claimed by one process: of two runs on it, the second is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedrac.server.outputs import LOCK, check_output_dir, claim_output_dir
from fedrac.settings.config import ConfigError

HOLD = ("import sys, time; from fedrac.server.outputs import claim_output_dir; "
        "claim_output_dir(sys.argv[1]); print('held', flush=True); time.sleep(60)")


def test_a_folder_held_by_another_process_is_refused_with_one_line(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"output_dir='{out}' is in use by another run "
                                              rf"\(pid {holder.pid}\)"):
            claim_output_dir(out)
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(out)  # the kernel dropped the dead holder's lock
    claim_output_dir(out)  # this process already holds it


def test_the_lock_file_alone_does_not_make_a_folder_hold_a_run(tmp_path):
    claim_output_dir(tmp_path / "run")
    assert (tmp_path / "run" / LOCK).is_file()
    check_output_dir({"output_dir": str(tmp_path / "run")})
