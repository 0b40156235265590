"""Results a transformers user can load: ``hf_model/`` and a PEFT ``adapter/``.

``hf_model/``: the final merged weights and the tokenizer, written with
``save_pretrained`` (load with ``AutoModelFor....from_pretrained``).
``adapter/``: for adapter strategies, ``ΔW = W - W0`` of every target layer as a PEFT LoRA
adapter, ``B = U_k S_k^½``, ``A = S_k^½ V_kᵀ``, ``lora_alpha = r`` (scale 1), plus the fully
trained modules (``modules_to_save``). ``ΔW``'s SVD comes from the factors the run merged
(:class:`fedrac.models.merged_factors.MergedFactors`: QR of the stacked factors and the SVD of
a small core, no dense ``d_out x d_in`` SVD); without such a record (an old checkpoint, a
dense merge) from the dense ``W - W0``. ``model.export_rank``: ``auto`` (default) is per layer
the smallest exact rank (the numerical rank, up to ``min(d_in, d_out)``), written with PEFT's
``rank_pattern`` / ``alpha_pattern``; an integer ``k`` is the best rank-``k`` truncation, with
the relative Frobenius error printed and returned; ``null`` is ``strategy.rank``.
Load with ``peft.PeftModel.from_pretrained(base, "adapter")`` on the base ``W0``
(``model.path``). Both folders are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedrac.adapters import LayerSpec
from fedrac.adapters.quantized import load_state, quantization_of, trim_heap
from fedrac.models.errors import ModelConfigError
from fedrac.models.merged_factors import RANK_TOL, MergedFactors, low_rank_svd, numerical_rank
from fedrac.settings.typed import ModelSettings, Settings

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
AUTO = "auto"


def check_export(cfg: Mapping[str, Any], layers: Mapping[str, LayerSpec] | None = None) -> None:
    """``model.export_rank``: ``auto``, null or an integer in ``1..min(d_in, d_out)`` of every
    target layer in ``layers``."""
    rank = cfg["model"].get("export_rank", AUTO)
    allowed = "auto (the smallest exact rank per layer), null (strategy.rank) or an integer >= 1"
    if rank == AUTO or rank is None:
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ModelConfigError(f"model.export_rank={rank!r} is not allowed; allowed: {allowed}")
    for spec in (layers or {}).values():
        limit = min(spec.d_in, spec.d_out)
        if rank > limit:
            raise ModelConfigError(
                f"model.export_rank={rank} is not allowed; allowed: auto or 1..{limit} (layer "
                f"'{spec.name}' is {spec.d_in}->{spec.d_out})")


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
    """``(A, B, error, norm)``: the best rank-``rank`` ``B @ A`` of ``delta`` (dense SVD), the
    Frobenius norm of what it leaves out, and that of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return _truncate(u, s, vh, rank)


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(A, B, error, norm)`` of the best rank-``rank`` part of ``U diag(S) Vh``, padded with
    zeros to ``rank`` (PEFT wants ``r`` rows/columns)."""
    k = min(int(rank), s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    if k < rank:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b, float(s[k:].square().sum().sqrt()), float(s.square().sum().sqrt())


def _delta(spec: LayerSpec, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    d = w.to(torch.float64) - w0.to(torch.float64)
    return d.T if spec.transposed else d.reshape(spec.d_out, spec.d_in)


def _dense_tol(w: torch.Tensor, spec: LayerSpec, s: torch.Tensor) -> float:
    """The relative rank tolerance of a dense ``W - W0``: :data:`RANK_TOL`, or the float
    rounding of the stored weights when that is larger (it would count as rank)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return RANK_TOL
    eps = torch.finfo(w.dtype).eps if w.is_floating_point() else 0.0
    noise = eps * float(w.abs().max()) * math.sqrt(max(spec.d_out, spec.d_in))
    return max(RANK_TOL, noise / float(s[0]))


def matches_weights(merged: MergedFactors, layers: Mapping[str, LayerSpec],
                    initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor]
                    ) -> str | None:
    """Why ``merged`` is not ``final - initial`` (``None``: it is, to the weights' float
    rounding), probed in float32 with one random vector per layer (no dense product)."""
    gen = torch.Generator().manual_seed(0)
    for name, spec in layers.items():
        w, w0 = final[spec.weight_key], initial[spec.weight_key]
        x = torch.randn(spec.d_in, 1, generator=gen)
        wx, w0x = _times(spec, w, x), _times(spec, w0, x)
        b, a = merged.stacks(name)
        gap = float((wx - w0x - b.float() @ (a.float() @ x)).norm())
        eps = torch.finfo(w.dtype).eps if w.is_floating_point() else 0.0
        tol = 32 * eps + 4 * math.sqrt(spec.d_in) * torch.finfo(torch.float32).eps
        if gap > tol * (float(wx.norm()) + float(w0x.norm())):
            return f"layer '{name}' differs from W - W0 by {gap:.3g}"
    return None


def _times(spec: LayerSpec, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's logical ``d_out x d_in`` weight times ``x`` (float32)."""
    w = w.float()
    return (x.T @ w).T if spec.transposed else w.reshape(spec.d_out, spec.d_in) @ x


def adapter_factors_of(
    layers: Mapping[str, LayerSpec], initial: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor], rank: int | str,
    merged: MergedFactors | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, float]:
    """Per layer ``(A, B)`` for ``ΔW`` of rank ``rank`` (``auto``: the layer's smallest exact
    rank, at least 1); total and worst relative error. ``merged``: take ``ΔW`` from the run's
    stacked factors (small SVDs); ``None``: from the dense ``final - initial``."""
    out, err2, norm2, worst = {}, 0.0, 0.0, 0.0
    for name, spec in layers.items():
        if merged is not None:
            u, s, vh = low_rank_svd(*merged.stacks(name))
            tol = RANK_TOL
        else:
            w = final[spec.weight_key]
            u, s, vh = torch.linalg.svd(_delta(spec, w, initial[spec.weight_key]),
                                        full_matrices=False)
            tol = _dense_tol(w, spec, s)
        k = max(1, min(numerical_rank(s, tol), spec.d_in, spec.d_out)) if rank == AUTO \
            else int(rank)
        a, b, err, norm = _truncate(u, s, vh, k)
        out[name] = (a.float(), b.float())
        err2, norm2 = err2 + err ** 2, norm2 + norm ** 2
        worst = max(worst, err / norm if norm > 0 else 0.0)
    return out, (math.sqrt(err2 / norm2) if norm2 > 0 else 0.0), worst


def dense_model(settings: ModelSettings, model: nn.Module) -> nn.Module:
    """``model`` itself, or for a quantised base (``model.quantization``) the same model
    built unquantised in its compute dtype (``model.dtype``): what ``hf_model/`` holds."""
    if quantization_of(settings.options) == "none":
        return model
    from fedrac.models.hf import build_hf_model

    num_labels = int(getattr(model.config, "num_labels", 2) or 2)
    dense = build_hf_model({**settings.options, "quantization": "none"}, num_labels)
    dense.config.id2label, dense.config.label2id = model.config.id2label, model.config.label2id
    return dense


def hold_weights(dense: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors ``dense``'s weights where they already have its dtype (no
    copy: a quantised run's ``hf_model/`` is written from the server's record itself), and
    copy the rest (a ``model.dtype`` other than float32)."""
    own = dense.state_dict()
    same = {k: v for k, v in state.items() if k in own and v.dtype == own[k].dtype}
    dense.load_state_dict(same, strict=False, assign=True)
    rest = {k: v for k, v in state.items() if k not in same}
    result = dense.load_state_dict(rest, strict=False)
    missing = set(result.missing_keys) - set(same)
    if missing or result.unexpected_keys:
        raise KeyError(f"weights do not fit the model: missing {sorted(missing)[:4]}, "
                       f"unexpected {sorted(result.unexpected_keys)[:4]}")
    trim_heap()  # the weights the model was built with


def export_transformers(
    settings: Settings, model: nn.Module, layers: Mapping[str, LayerSpec],
    initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike, merged: MergedFactors | None = None,
) -> dict[str, Any]:
    """Write ``hf_model/`` (and ``adapter/`` for adapter strategies); what was written.
    ``merged``: the run's merges as stacked factors (``adapter/`` without dense SVDs)."""
    from fedrac.adapters import remove_adapters
    from fedrac.models.hf import load_tokenizer, tokenizer_source
    from fedrac.models.shared import module_keys

    out = Path(out_dir)
    model_cfg = settings.model.options  # the option's own keys (path, task, export_rank)
    source = tokenizer_source(model_cfg)
    tok = load_tokenizer(source) if source else None
    remove_adapters(model)
    dense = dense_model(settings.model, model)
    if dense is model:
        load_state(dense, final)
    else:
        hold_weights(dense, final)
    if dense is model:
        model.cpu()

    def write_model(tmp: Path) -> None:
        dense.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))

    _atomic_dir(out / "hf_model", write_model)
    dense = None  # free an unquantised copy before the adapter is written
    trim_heap()
    result: dict[str, Any] = {"hf_model": "hf_model"}
    if settings.strategy.name == "fedavg":
        print("export: hf_model/ (save_pretrained); no adapter/ for full fine-tuning", flush=True)
        return result
    setting = model_cfg.get("export_rank", AUTO)
    rank = AUTO if setting == AUTO else int(setting or settings.strategy.rank)
    t0 = time.perf_counter()
    problem = None if merged is None else matches_weights(merged, layers, initial, final)
    if problem is not None:
        print(f"export: the run's factor record does not match the weights ({problem}); "
              "adapter/ from the dense SVD", flush=True)
        merged = None
    factors, rel, worst = adapter_factors_of(layers, initial, final, rank, merged)
    seconds = time.perf_counter() - t0
    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != default}
    modules = list(module_keys(model, settings.model))
    from fedrac.models.hf import trainable_modules

    module_names = list(trainable_modules(model, model_cfg.get("trainable_modules", "auto")))

    def write_adapter(tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=default, lora_alpha=default, rank_pattern=pattern, alpha_pattern=dict(pattern),
            lora_dropout=0.0, target_modules=sorted(layers),
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

    _atomic_dir(out / "adapter", write_adapter)  # the files are the factors and the trained
    # modules alone: the base under the PEFT layers is not saved, so it is not set back to W0
    # (a quantised base would be requantised for nothing); every user of the process's model
    # loads its weights first (fedrac.models.shared)
    size = sum(f.stat().st_size for f in (out / "adapter").iterdir() if f.is_file())
    low, high = min(ranks.values()), max(ranks.values())
    shown = f"rank {rank}" if rank != AUTO else \
        f"rank auto: {low}" + (f"..{high} per layer" if high > low else "")
    source = "from the run's factors" if merged is not None else "dense SVD of W - W0"
    print(f"export: hf_model/ (save_pretrained) and adapter/ (PEFT LoRA, {shown}, {size} bytes, "
          f"{source} in {seconds:.2f} s): relative error of dW {rel:.3g} "
          f"(worst layer {worst:.3g})", flush=True)
    result.update({"adapter": "adapter", "export_rank": rank, "adapter_ranks": ranks,
                   "adapter_bytes": size, "adapter_from_factors": merged is not None,
                   "adapter_seconds": seconds,
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
