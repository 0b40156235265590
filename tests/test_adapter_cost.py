"""Adapters cost what PEFT's cost: FLOPs of one training step on a tiny LLaMA (DESIGN.md §2)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedrac.adapters import attach_adapters, find_target_layers, remove_adapters
from fedrac.adapters.sketch import make_sketch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).train()


def _step_flops(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """FLOPs of one forward and backward pass of the causal LM loss."""
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


def test_a_training_step_costs_what_peft_costs() -> None:
    """rac_lora's layout (A a frozen sketch, B trained) against PEFT's ``LoraModel`` with
    ``lora_A`` frozen: within 2% (a rebuilt ``W + s B A`` would add ``2 r d_in d_out`` per
    layer and its weight gradient ``2 T d_in d_out``: here tens of percent)."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    model = _llama()
    layers = find_target_layers(model, TARGETS)
    assert len(layers) == 14
    factors = {n: (make_sketch(3, f"{n}.lora_A", s.factor_shape("A", RANK), "gaussian"),
                   torch.zeros(s.factor_shape("B", RANK))) for n, s in layers.items()}
    attach_adapters(model, layers, factors, RANK, ALPHA, {n: "B" for n in layers})
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 14 and all(p.shape[1] == RANK for p in trained)
    ours = _step_flops(model, ids)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    remove_adapters(model)

    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                  target_modules=TARGETS))
    for name, p in peft_model.named_parameters():
        p.requires_grad_(".lora_B." in name)
    theirs = _step_flops(peft_model, ids)
    assert ours <= 1.02 * theirs, (ours, theirs)
    assert ours >= 0.98 * theirs, (ours, theirs)  # and not by skipping work
