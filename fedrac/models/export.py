"""Results a transformers user can load: ``hf_model/`` and a PEFT ``adapter/``.

``hf_model/``: the final merged weights and the tokenizer, written with
``save_pretrained`` (load with ``AutoModelFor....from_pretrained``).
``adapter/``: for adapter strategies, ``ΔW = W - W0`` of every target layer as a PEFT LoRA
adapter of rank ``model.export_rank`` (default ``strategy.rank``): ``B = U_k S_k^½``,
``A = S_k^½ V_kᵀ`` from the SVD of ``ΔW``, ``lora_alpha = r`` (scale 1), plus the fully
trained modules (``modules_to_save``). Exact when ``ΔW`` has rank <= ``export_rank`` (one
FedIT / FFA-LoRA adapter); a RAC-LoRA chain accumulates up to ``rank x rounds`` and is
truncated, with the relative Frobenius error printed and returned. Load with
``peft.PeftModel.from_pretrained(base, "adapter")`` on the base ``W0`` (``model.path``).
Both folders are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedrac.lora import LayerSpec
from fedrac.models.errors import ModelConfigError

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def check_export(cfg: Mapping[str, Any]) -> None:
    """``model.export_rank``: null or an integer >= 1."""
    rank = cfg["model"].get("export_rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ModelConfigError(f"model.export_rank={rank!r} is not allowed; allowed: null "
                               "(strategy.rank) or an integer >= 1")


def _atomic_dir(final: Path, write) -> None:
    """``write(tmp)`` into a fresh folder beside ``final``, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(A, B, error, norm)``: the best rank-``rank`` ``B @ A`` of ``delta`` (SVD), the
    Frobenius norm of what it leaves out, and that of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(int(rank), s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    if k < rank:  # pad to the requested rank with zeros (PEFT wants r rows/columns)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b, float(s[k:].square().sum().sqrt()), float(s.square().sum().sqrt())


def _delta(spec: LayerSpec, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    d = w.to(torch.float64) - w0.to(torch.float64)
    return d.T if spec.transposed else d.reshape(spec.d_out, spec.d_in)


def adapter_factors_of(
    layers: Mapping[str, LayerSpec], initial: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor], rank: int,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, float]:
    """Per layer ``(A, B)`` of rank ``rank`` for ``ΔW``; total and worst relative error."""
    out, err2, norm2, worst = {}, 0.0, 0.0, 0.0
    for name, spec in layers.items():
        a, b, err, norm = low_rank(_delta(spec, final[spec.weight_key],
                                          initial[spec.weight_key]), rank)
        out[name] = (a.float(), b.float())
        err2, norm2 = err2 + err ** 2, norm2 + norm ** 2
        worst = max(worst, err / norm if norm > 0 else 0.0)
    return out, (math.sqrt(err2 / norm2) if norm2 > 0 else 0.0), worst


def export_transformers(
    cfg: Mapping[str, Any], model: nn.Module, layers: Mapping[str, LayerSpec],
    initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Write ``hf_model/`` (and ``adapter/`` for adapter strategies); what was written."""
    from clients.handlers import module_keys
    from fedrac.lora import remove_adapters
    from fedrac.models.hf import load_tokenizer, tokenizer_source

    out = Path(out_dir)
    model_cfg = cfg["model"]
    source = tokenizer_source(model_cfg)
    tok = load_tokenizer(source) if source else None
    remove_adapters(model)
    model.load_state_dict(final)
    model.cpu()

    def write_model(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))

    _atomic_dir(out / "hf_model", write_model)
    result: dict[str, Any] = {"hf_model": "hf_model"}
    if cfg["strategy"]["name"] == "fedavg":
        print("export: hf_model/ (save_pretrained); no adapter/ for full fine-tuning", flush=True)
        return result
    rank = int(model_cfg.get("export_rank") or cfg["strategy"]["rank"])
    factors, rel, worst = adapter_factors_of(layers, initial, final, rank)
    modules = list(module_keys(model, cfg))
    from fedrac.models.hf import trainable_modules

    module_names = list(trainable_modules(model, model_cfg.get("trainable_modules", "auto")))

    def write_adapter(tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model

        model.load_state_dict(initial)  # W0 under the adapter (and the initial head)
        peft_cfg = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(layers),
            modules_to_save=module_names or None,
            fan_in_fan_out=any(s.transposed for s in layers.values()),
            task_type=PEFT_TASK_TYPES.get(str(model_cfg.get("task") or "classification")),
            base_model_name_or_path=str(model_cfg.get("path") or ""))
        peft_model = get_peft_model(model, peft_cfg)
        with torch.no_grad():
            for name, (a, b) in factors.items():
                lora = peft_model.base_model.model.get_submodule(name)
                lora.lora_A["default"].weight.copy_(a)
                lora.lora_B["default"].weight.copy_(b)
            for key in modules:
                owner = next(m for m in module_names if key.startswith(m + "."))
                wrapper = peft_model.base_model.model.get_submodule(owner)
                wrapper.modules_to_save["default"].get_parameter(key[len(owner) + 1:]).copy_(
                    final[key])
        peft_model.save_pretrained(str(tmp))
        peft_model.unload()  # the PEFT layers out again: the model is fedrac's once more

    _atomic_dir(out / "adapter", write_adapter)
    model.load_state_dict(final)
    print(f"export: hf_model/ (save_pretrained) and adapter/ (PEFT LoRA, rank {rank}): "
          f"relative error of dW {rel:.3g} (worst layer {worst:.3g})", flush=True)
    result.update({"adapter": "adapter", "export_rank": rank,
                   "adapter_relative_error": rel, "adapter_worst_layer_error": worst})
    return result


def set_label_names(model: nn.Module, names: Sequence[str] | None) -> None:
    """``id2label`` / ``label2id`` of a sequence classifier's config from the label names, so
    that ``save_pretrained`` writes them and a ``pipeline()`` answers with the names."""
    config = getattr(model, "config", None)
    if not names or config is None or not hasattr(config, "id2label"):
        return
    if len(names) != int(getattr(config, "num_labels", len(names))):
        return
    config.id2label = {i: str(n) for i, n in enumerate(names)}
    config.label2id = {str(n): i for i, n in enumerate(names)}


def tidy_adapter_config(folder: str | os.PathLike) -> None:
    """``adapter_config.json``: each of ``target_modules`` / ``modules_to_save`` once, sorted
    (PEFT adds the classifier to ``modules_to_save`` again, and writes sets unordered)."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(data.get(key), list):
            data[key] = sorted(set(data[key]))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def truncation_hint(result: Mapping[str, Any], tolerance: float = 1e-3) -> str | None:
    """One line when ``adapter/`` is a truncated copy of ``W - W0``: how to make it exact."""
    err = result.get("adapter_relative_error")
    if err is None or err <= tolerance:
        return None
    return (f"export: adapter/ is a rank-{result.get('export_rank')} truncation of W - W0 "
            f"(relative error {err:.3g}); hf_model/ is exact. For an exact adapter/ raise "
            "model.export_rank (e.g. model.export_rank=<strategy.rank x num_rounds>)")
