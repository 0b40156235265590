"""What ``hf_model/`` and ``adapter/`` say about labels and modules (fedrac/models/export.py)."""

from __future__ import annotations

import json

from fedrac.models.export import set_label_names, tidy_adapter_config, truncation_hint


def _classifier(num_labels: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("bert", vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(config)


def test_saved_config_carries_the_label_names(tmp_path):
    from transformers import AutoConfig

    model = _classifier(3)
    set_label_names(model, ["food", "money", "sport"])
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.id2label == {0: "food", 1: "money", 2: "sport"}
    assert config.label2id == {"food": 0, "money": 1, "sport": 2}


def test_label_names_that_do_not_fit_the_head_are_left_out():
    model = _classifier(3)
    set_label_names(model, ["a", "b"])
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    set_label_names(model, None)
    assert model.config.id2label[0] == "LABEL_0"


def test_adapter_config_lists_each_module_once_in_a_stable_order(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "r": 2, "target_modules": ["value", "query", "value"],
        "modules_to_save": ["classifier", "score", "classifier"]}))
    tidy_adapter_config(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["target_modules"] == ["query", "value"]
    assert data["modules_to_save"] == ["classifier", "score"]
    assert data["r"] == 2


def test_a_truncated_adapter_says_how_to_make_it_exact():
    hint = truncation_hint({"export_rank": 1, "adapter_relative_error": 0.35})
    assert "rank-1 truncation" in hint and "0.35" in hint and "model.export_rank" in hint
    assert truncation_hint({"export_rank": 8, "adapter_relative_error": 1e-7}) is None
    assert truncation_hint({"hf_model": "hf_model"}) is None  # fedavg: no adapter
