"""spectrum.csv keeps one line ending (LF) across a resume."""

from __future__ import annotations

import torch

from fedrac.adapters import LayerSpec
from fedrac.server.spectrum import SpectrumMonitor


def test_spectrum_csv_is_lf_only_after_a_resume(tmp_path):
    layers = {"l": LayerSpec("l", (4, 3))}
    w0 = {"l.weight": torch.zeros(4, 3)}
    first = SpectrumMonitor(tmp_path, layers, w0, num_rounds=4)
    first.observe(1, {"l.weight": torch.ones(4, 3)})
    saved = first.state_dict()
    first.close()
    resumed = SpectrumMonitor(tmp_path, layers, w0, num_rounds=4)
    resumed.load_state_dict(saved)
    resumed.observe(2, {"l.weight": 2 * torch.ones(4, 3)})
    resumed.close()
    data = (tmp_path / "spectrum.csv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 3  # header + rounds 1 and 2
