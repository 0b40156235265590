"""Bad data stops the run with one line naming the file, row or line and the problem."""

from __future__ import annotations

import numpy as np
import pytest

from fedrac.data import build_splits
from fedrac.data.sources import DataConfigError

FILES = {"name": "files", "test_fraction": 0.25, "split_seed": 0}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _png_folder(root, n: int = 4):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_a_corrupt_png_is_named(tmp_path):
    _png_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated
    with pytest.raises(DataConfigError) as err:
        build_splits({**FILES, "path": str(tmp_path / "imgs")})
    assert f"image '{bad}' cannot be read" in _one_line(err)


def test_a_column_of_mixed_types_is_refused_naming_it(tmp_path):
    rows = "\n".join(f"{i % 7}.5,{i % 2}" for i in range(20))
    (tmp_path / "t.csv").write_text(f"f0,label\n{rows}\noops,1\n")
    with pytest.raises(DataConfigError) as err:
        build_splits({**FILES, "path": str(tmp_path / "t.csv")})
    assert "column 'f0'" in _one_line(err) and "mixes numbers and text (row 20: 'oops')" in \
        str(err.value)


def test_one_class_is_refused_naming_the_data(tmp_path):
    rows = "\n".join(f"{i}.0,{i * 2}.0,7" for i in range(20))
    (tmp_path / "t.csv").write_text(f"a,b,label\n{rows}\n")
    with pytest.raises(DataConfigError) as err:
        build_splits({**FILES, "path": str(tmp_path / "t.csv")})
    assert "has one class in its target training split" in _one_line(err)


def test_a_broken_json_line_is_named(tmp_path):
    lines = [f'{{"a": {i}.0, "label": {i % 2}}}' for i in range(10)]
    lines[6] = '{"a": 6.0, "label": '
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataConfigError) as err:
        build_splits({**FILES, "path": str(tmp_path / "t.jsonl")})
    assert "line 7 is not JSON" in _one_line(err)


@pytest.mark.parametrize("text", ["", "a,b,label\n"], ids=["empty", "header_only"])
def test_an_empty_csv_says_so(tmp_path, text):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataConfigError) as err:
        build_splits({**FILES, "path": str(tmp_path / "t.csv")})
    assert "has no rows" in _one_line(err)


def test_a_full_disk_is_one_line_and_exit_1(tmp_path):
    """ENOSPC while the run writes: one line naming the file, exit 1 (nothing half-written:
    every result file is written atomically)."""
    import os
    import subprocess
    import sys

    code = ("import errno, sys, fedrac.run as r\n"
            "def full(cfg): raise OSError(errno.ENOSPC, 'No space left on device', "
            "cfg['output_dir'] + '/metrics.csv')\n"
            "r.run_experiment = full\n"
            "from fedrac.cli import main\n"
            f"sys.argv = ['fedrac', 'output_dir={tmp_path / 'out'}', 'num_rounds=1']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fedrac: error: no space left on the device writing "
                                f"{tmp_path / 'out' / 'metrics.csv'}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_nan_in_a_text_column_names_the_row(tmp_path):
    from tests import hf_models as H

    tok = H.build_checkpoint(tmp_path / "bert", "bert")
    rows = H.sentiment_rows(20)
    text = "text,label\n" + "".join(
        f"{'' if i == 13 else r['text']},{r['label']}\n" for i, r in enumerate(rows))
    (tmp_path / "t.csv").write_text(text)
    cfg = {**FILES, "path": str(tmp_path / "t.csv"), "text_column": "text",
           "tokenizer": str(tok), "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataConfigError) as err:
        build_splits(cfg)
    line = _one_line(err)
    assert "dataset.text_column='text' has no text in data row 14 of" in line
    assert "t.csv" in line
