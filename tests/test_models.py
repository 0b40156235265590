"""Models (mlp, cnn, vit_tiny), LoRA targets, pretrained weights, and the checks run at start."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from fedrac.adapters import find_target_layers
from fedrac.models import ModelConfigError, build_model, check_model_input, load_weights
from fedrac.settings.config import ConfigError, conf_dir, validate


def _cfg(*overrides: str) -> dict:
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=["engine=inline", *overrides])


def _model_cfg(name: str, **extra) -> dict:
    return {**OmegaConf.to_container(_cfg(f"model={name}").model), **extra}


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("name", ["mlp", "cnn", "vit_tiny"])
def test_models_take_images_and_output_the_classes(name, shape):
    model = build_model(_model_cfg(name), shape, 7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_vit_tiny_default_targets_are_the_attention_and_mlp_projections():
    cfg = _model_cfg("vit_tiny")
    model = build_model(cfg, (1, 8, 8), 5)
    layers = find_target_layers(model, cfg["target_modules"])
    expected = {f"blocks.{b}.{m}" for b in range(cfg["depth"])
                for m in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")}
    assert set(layers) == expected
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in layers)


def test_input_shapes_the_models_cannot_take():
    with pytest.raises(ModelConfigError, match=r"model=cnn cannot take input shape \(64,\); "
                                               r"allowed: images \(C, H, W\)"):
        build_model(_model_cfg("cnn"), (64,), 5)
    with pytest.raises(ModelConfigError, match=r"model.patch_size=3 does not divide the input "
                                               r"size 8x8"):
        build_model(_model_cfg("vit_tiny", patch_size=3), (1, 8, 8), 5)
    mlp = build_model(_model_cfg("mlp"), (64,), 5)
    with pytest.raises(ModelConfigError, match=r"model=mlp cannot take input shape \(1, 9, 9\)"):
        check_model_input(mlp, (1, 9, 9), 5, "mlp")


def test_weights_load_from_safetensors_and_pt(tmp_path):
    cfg = _model_cfg("cnn")
    src = build_model(cfg, (1, 8, 8), 5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        dst = build_model(cfg, (1, 8, 8), 5)
        load_weights(dst, tmp_path / name)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_mismatched_or_missing_weights_are_named(tmp_path):
    cfg = _model_cfg("mlp")
    state = build_model(cfg, (64,), 5).state_dict()
    state.pop("head.bias")
    state["extra"] = torch.zeros(1)
    state["fc1.weight"] = torch.zeros(64, 10)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelConfigError, match=r"does not fit the model: missing keys "
                                               r"\['head.bias'\]; unexpected keys \['extra'\]; "
                                               r"shape mismatches \['fc1.weight \(64, 10\) vs "
                                               r"\(64, 64\)'\]"):
        load_weights(build_model(cfg, (64,), 5), tmp_path / "bad.pt")
    with pytest.raises(ModelConfigError, match=r"model.weights=.*nope.pt' does not exist"):
        load_weights(build_model(cfg, (64,), 5), tmp_path / "nope.pt")


def test_weights_seed_pretraining_and_change_the_cache_key(tmp_path):
    from fedrac.models.pretrain import pretrained_state

    cfg = OmegaConf.to_container(_cfg("pretrain.epochs=0"), resolve=True)
    model_cfg = cfg["model"]
    src = build_model(model_cfg, (1, 8, 8), 5)
    torch.nn.init.constant_(src.head.bias, 0.25)
    save_file(dict(src.state_dict()), str(tmp_path / "w.safetensors"))
    state = pretrained_state({**model_cfg, "weights": str(tmp_path / "w.safetensors")},
                             cfg["dataset"], cfg["pretrain"], tmp_path / "cache")
    assert torch.equal(state["head.bias"], torch.full((5,), 0.25))
    torch.nn.init.constant_(src.head.bias, -1.0)
    save_file(dict(src.state_dict()), str(tmp_path / "w.safetensors"))
    state = pretrained_state({**model_cfg, "weights": str(tmp_path / "w.safetensors")},
                             cfg["dataset"], cfg["pretrain"], tmp_path / "cache")
    assert torch.equal(state["head.bias"], torch.full((5,), -1.0))


@pytest.mark.parametrize("overrides, message", [
    (["model=cnn", "dataset=files", "dataset.path=@CSV@"],
     r"model=cnn cannot take input shape \(2,\); allowed: images"),
    (["model.weights=/nonexistent/w.pt"], r"model.weights='/nonexistent/w.pt' does not exist"),
    (["dataset=files", "dataset.path=/nonexistent/data"],
     r"dataset.path='/nonexistent/data' does not exist"),
    (["num_clients=1000"], r"num_clients=1000 is more than the 672 target training samples"),
    (["partitioner.alpha=0.01", "partitioner.min_partition_size=40"],
     r"partitioner.alpha=0.01 cannot give each of the 10 clients .*alpha=\d"),
    (["dataset=custom"], r"dataset._target_=None is not set"),
    (["model=custom"], r"model._target_=None is not set"),
    (["partitioner=natural"], r"partitioner.partition_by=None is not set"),
])
def test_bad_input_stops_validation_with_one_line(tmp_path, overrides, message):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n" + "\n".join(f"{i},{i * 2},{i % 2}" for i in range(20)))
    cfg = _cfg(*(o.replace("@CSV@", str(csv)) for o in overrides))
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
