"""Pretraining: the warning for never-pretrained weights, and caches that do not depend on
the machine."""

from __future__ import annotations

import logging

import numpy as np


def _csv(path):
    rng = np.random.default_rng(0)
    rows = ["a,b,label"] + [f"{rng.normal(i % 4):.3f},{rng.normal():.3f},{i % 4}"
                            for i in range(80)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _state(tmp_path, *extra):
    from bench.common import compose_cfg
    from fedrac.models import pretrain

    pretrain._warned.clear()
    cfg = compose_cfg("dataset=files", f"dataset.path={_csv(tmp_path / 'd.csv')}",
                      "partitioner=iid", "num_clients=2", *extra)
    return pretrain.pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"],
                                     tmp_path / "cache")


def test_no_source_part_warns_fresh_and_from_the_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedrac.models.pretrain")
    _state(tmp_path)
    text = caplog.text
    assert "never pretrained (the data set has no source part" in text
    assert "initial weights (never pretrained) cached" in text
    assert "pretrained weights cached" not in text
    caplog.clear()
    _state(tmp_path)  # from the cache: still said
    assert "never pretrained (the data set has no source part" in caplog.text


def test_a_source_part_does_not_warn(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedrac.models.pretrain")
    _state(tmp_path, "dataset.source_classes=[0,1]", "dataset.target_classes=[2,3]",
           "pretrain.epochs=1")
    assert "never pretrained" not in caplog.text
    assert "pretrained weights cached" in caplog.text


def test_pretrained_weights_do_not_depend_on_torchs_thread_count(tmp_path):
    """A fresh cache gives the same weights on any machine (README figures reproduce)."""
    import torch

    from bench.common import compose_cfg
    from fedrac.models.pretrain import pretrained_state

    cfg = compose_cfg("pretrain.epochs=3")
    threads = torch.get_num_threads()
    states = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            states.append(pretrained_state(cfg["model"], cfg["dataset"], cfg["pretrain"],
                                           tmp_path / f"cache{n}"))
            assert torch.get_num_threads() == n  # restored after pretraining
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
