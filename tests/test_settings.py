"""The typed settings (fedrac/settings/typed.py): made from the validated config once, with the
config's own key names and values, for every option of every group."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedrac.settings.config import conf_dir, group_options, validate
from fedrac.settings.typed import ClientSettings, RunSettings, settings_of


def _composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("config", overrides=list(overrides))


def test_settings_carry_the_validated_values_under_the_config_names(tmp_path):
    d = validate(_composed("num_rounds=7", "eval_every=3", "client.lr=0.125", "seed=5",
                           "strategy.rank=2", "monitor.top_k=4", f"cache_dir={tmp_path}"))
    s = settings_of(d)
    assert s.config is d
    assert {f.name for f in dataclasses.fields(ClientSettings)} == set(d["client"])
    assert dataclasses.asdict(s.client) == d["client"]
    run_fields = {f.name for f in dataclasses.fields(RunSettings)}
    scalars = {k for k, v in d.items() if not isinstance(v, dict)}
    assert scalars <= run_fields, f"run keys without a typed field: {scalars - run_fields}"
    for key in scalars:
        assert getattr(s.run, key) == d[key], key
    assert (s.run.num_rounds, s.run.eval_every, s.run.seed) == (7, 3, 5)
    assert s.run.monitor.top_k == 4 and s.strategy.rank == 2 and s.client.lr == 0.125
    assert s.strategy.options is d["strategy"] and s.model.options is d["model"]
    assert s.data.dataset is d["dataset"] and s.data.name == "digits"
    assert (s.privacy.mode, s.privacy.secagg) == ("none", "none")
    assert s.run.tune is d["tune"] and s.run.tune["name"] == "none"


@pytest.mark.parametrize("group", ["strategy", "model", "privacy", "secagg", "engine",
                                   "aggregation", "partitioner", "logger", "task"])
def test_every_option_of_a_group_gives_settings(group):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        composed = [compose("config", overrides=[f"{group}={o}"]) for o in group_options(group)]
    for cfg in (OmegaConf.to_container(c, resolve=True) for c in composed):
        s = settings_of(cfg)
        assert s.config is cfg
        assert s.strategy.name == cfg["strategy"]["name"]
        assert s.privacy.mode == cfg["privacy"]["mode"]
