"""The packaged experiments' bodies must not set what their sweep's settings and arms set.

Hydra merges an experiment's body after the sweep's ``+setting`` / ``+arm`` choices (the
sweeper's parameters come first in each job's overrides), so a key in both is silently taken
from the experiment: ``text_minilm``'s ``client.local_epochs: 1`` once overrode
``dir03_text``'s 3 epochs, and ``digits_table``'s ``strategy.rank: 1`` overrode ``fed_sb_r5``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def _keys(node, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in node.items():
        if key in ("defaults", "hydra"):
            continue
        path = f"{prefix}{key}"
        out |= _keys(value, path + ".") if isinstance(value, dict) else {path}
    return out


def _body(path: Path) -> set[str]:
    return _keys(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


EXPERIMENTS = sorted(p for p in (CONF / "experiment").glob("*.yaml")
                     if "sweeper" in p.read_text())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_body_leaves_its_settings_and_arms_keys_alone(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    params = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    body = _body(path)
    for group in ("setting", "arm"):
        for choice in str(params.get(f"+{group}", "")).split(","):
            if not choice:
                continue
            clash = body & _body(CONF / group / f"{choice.strip()}.yaml")
            assert not clash, f"{path.stem} sets {sorted(clash)}, which +{group}={choice} sets"


def test_the_check_sees_a_clash(tmp_path):
    assert "client.local_epochs" in _body(CONF / "setting" / "dir03_text.yaml")
    assert "strategy.rank" in _body(CONF / "arm" / "fed_sb_r5.yaml")
