"""The pretrained-weights cache: damaged entries are rebuilt with a warning naming the file, and
a `_target_` model's source is part of the key."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest
import torch

from fedrac.models import ModelConfigError, build_model
from fedrac.models.pretrain import pretrained_state

DATASET = {"name": "digits", "source_classes": [0, 1, 2, 3, 4],
           "target_classes": [5, 6, 7, 8, 9], "test_fraction": 0.2, "seed": 0}
MODEL = {"name": "mlp", "hidden": [8]}
PRETRAIN = {"epochs": 1, "lr": 0.01, "batch_size": 32, "optimizer": "adamw", "seed": 0}


def _entry(cache) -> object:
    (path,) = list(cache.iterdir())
    return path


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "data_bytes":  # flip bytes in the tensor data (the file still parses)
        for i in range(len(data) - 40, len(data) - 8):
            data[i] ^= 0xFF
    elif how == "header_bytes":  # break the JSON header
        data[12:20] = b"\x00garbage"
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "nan":  # a NaN where a weight was: the digest no longer matches
        data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["data_bytes", "header_bytes", "truncated", "nan"])
def test_a_damaged_entry_is_rebuilt_with_a_warning_naming_the_file(tmp_path, caplog, how):
    cache = tmp_path / "cache"
    fresh = pretrained_state(MODEL, DATASET, PRETRAIN, cache)
    path = _entry(cache)
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="fedrac.models.pretrain"):
        again = pretrained_state(MODEL, DATASET, PRETRAIN, cache)
    assert str(path) in caplog.text and "rebuilding it" in caplog.text
    assert again.keys() == fresh.keys()
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)  # same weights, all finite
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedrac.models.pretrain"):
        pretrained_state(MODEL, DATASET, PRETRAIN, cache)  # the rebuilt entry is sound
    assert "rebuilding" not in caplog.text


def test_an_entry_without_a_checksum_is_rebuilt(tmp_path, caplog):
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    fresh = pretrained_state(MODEL, DATASET, PRETRAIN, cache)
    path = _entry(cache)
    save_file({k: torch.zeros_like(v) for k, v in fresh.items()}, str(path))  # no digest
    with caplog.at_level(logging.WARNING, logger="fedrac.models.pretrain"):
        again = pretrained_state(MODEL, DATASET, PRETRAIN, cache)
    assert f"{path} has no checksum" in caplog.text
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)


MODULE_V1 = """
    from torch import nn

    class Net(nn.Module):
        def __init__(self, input_shape, num_classes):
            super().__init__()
            self.flat = nn.Flatten()
            self.out = nn.Linear(int(input_shape[-1]) * int(input_shape[-2]), num_classes)

        def forward(self, x):
            return self.out(self.flat(x))
"""
MODULE_V2 = MODULE_V1.replace(
    "self.out = nn.Linear(int(input_shape[-1]) * int(input_shape[-2]), num_classes)",
    "self.hidden = nn.Linear(int(input_shape[-1]) * int(input_shape[-2]), 6)\n"
    "            self.out = nn.Linear(6, num_classes)").replace(
    "return self.out(self.flat(x))", "return self.out(self.hidden(self.flat(x)).relu())")


def test_editing_a_target_model_s_code_gives_a_new_entry(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "guard_net.py").write_text(textwrap.dedent(MODULE_V1))
    monkeypatch.syspath_prepend(str(code))
    model = {"_target_": "guard_net.Net", "target_modules": ["all"]}
    first = pretrained_state(model, DATASET, PRETRAIN, tmp_path / "cache")
    assert set(first) == {"out.weight", "out.bias"}
    (code / "guard_net.py").write_text(textwrap.dedent(MODULE_V2))
    sys.modules.pop("guard_net", None)  # a new process would import the edited file
    second = pretrained_state(model, DATASET, PRETRAIN, tmp_path / "cache")
    assert set(second) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    net = build_model(model, (1, 8, 8), 5)
    net.load_state_dict(second)  # the entry fits the edited model: no state_dict traceback
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_pretraining_that_diverges_is_refused_not_cached(tmp_path):
    with pytest.raises(ModelConfigError, match="non-finite weights.*pretrain.lr=1e\\+30"):
        pretrained_state(MODEL, DATASET, {**PRETRAIN, "lr": 1e30, "optimizer": "sgd"},
                         tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
