"""LoRA-SB's initialisation step (Fed-SB): the truncated SVD of ``M = -eta * sign(G)``.

The one function both sides run: the server on the init clients' mean gradient, or a single
init client on its own gradient (it then uploads ``U_r``, ``S_r``, ``V_rᵀ``, not ``G``).
"""

from __future__ import annotations

import torch

# a gradient request's config keys asking for the SVD reply, and that reply's array keys
INIT_RANK_KEY, INIT_STEP_KEY = "init-rank", "init-step"
SVD_PARTS = ("init_U", "init_S", "init_Vh")  # <layer>.init_U (d_out x r), _S (r), _Vh (r x d_in)


def signed_step_svd(gradient: torch.Tensor, rank: int, step: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, V_rᵀ)`` (float64; ``d_out x r``, ``r``, ``r x d_in``) of the exact SVD of
    ``M = -step * sign(G)``, ``G`` one layer's gradient (``d_out x d_in``):
    ``U_r diag(S_r) V_rᵀ`` is the best rank-``r`` approximation of ``M``."""
    m = -float(step) * torch.sign(gradient.to(torch.float64))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()
