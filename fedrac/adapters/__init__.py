"""LoRA adapters on the forward path, apart as in PEFT's ``tuners/lora/``.

- :mod:`~fedrac.adapters.config`: layer shapes, ranks, the trained side, factor dtypes;
- :mod:`~fedrac.adapters.layer`: one layer's low-rank path ``s * ((x Aᵀ) Bᵀ)``;
- :mod:`~fedrac.adapters.model`: targets on a model, attach, read, merge, remove.
"""

from fedrac.adapters.config import (
    FACTOR_DTYPE,
    TRAIN_FACTORS,
    AdapterConfigError,
    LayerSpec,
    adapter_dtype,
    check_rank,
    delta_weight,
    resolve_trained,
)
from fedrac.adapters.layer import LoRAAdapter
from fedrac.adapters.model import (
    adapter_factors,
    attach_adapters,
    attached,
    default_target_modules,
    effective_weights,
    find_target_layers,
    is_adaptable,
    is_transposed,
    layer_names,
    merge_adapters,
    remove_adapters,
)

__all__ = [
    "FACTOR_DTYPE",
    "TRAIN_FACTORS",
    "AdapterConfigError",
    "LayerSpec",
    "LoRAAdapter",
    "adapter_dtype",
    "adapter_factors",
    "attach_adapters",
    "attached",
    "check_rank",
    "default_target_modules",
    "delta_weight",
    "effective_weights",
    "find_target_layers",
    "is_adaptable",
    "is_transposed",
    "layer_names",
    "merge_adapters",
    "remove_adapters",
    "resolve_trained",
]
