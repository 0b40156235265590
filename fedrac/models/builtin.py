"""fedrac's built-in architectures: ``MLP``, a small ``CNN`` and ``ViTTiny``.

Each takes the task's ``input_shape`` (without the batch dimension) and ``num_classes``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fedrac.models.errors import ModelConfigError


class MLP(nn.Sequential):
    """``flatten -> fc1 -> relu -> ... -> head``; layer names ``fc1, fc2, ..., head``."""

    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        dims = [int(input_dim), *(int(h) for h in hidden)]
        layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True), start=1):
            layers[f"fc{i}"] = nn.Linear(d_in, d_out)
            layers[f"act{i}"] = nn.ReLU()
        layers["head"] = nn.Linear(dims[-1], int(num_classes))
        super().__init__(OrderedDict(layers))


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelConfigError(f"model={model} cannot take input shape {tuple(input_shape)}; "
                               "allowed: images (C, H, W) (use model=mlp for flat features)")
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


class CNN(nn.Module):
    """Two 3x3 conv layers (each ReLU + 2x2 max-pool), a dense layer and a head.

    Layer names ``conv1, conv2, fc, head``: the pfl-research / FedAvg-paper style small CNN.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "cnn")
        if h < 4 or w < 4:
            raise ModelConfigError(f"model=cnn cannot take input shape {tuple(input_shape)}; "
                                   "allowed: images at least 4x4 (two 2x2 poolings)")
        c1, c2 = (int(v) for v in channels)
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), int(hidden))
        self.head = nn.Linear(int(hidden), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


class Attention(nn.Module):
    """Multi-head self-attention with ``q, k, v, out`` as ``nn.Linear`` (LoRA targets)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                                       split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLPBlock(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), MLPBlock(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A small vision transformer: conv patch embedding, class token, ``depth`` blocks, head.

    Layer names: ``patch_embed``, ``blocks.<i>.attn.{q,k,v,out}``,
    ``blocks.<i>.mlp.{fc1,fc2}``, ``head``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "vit_tiny")
        p = int(patch_size)
        if p < 1 or h % p or w % p:
            raise ModelConfigError(f"model.patch_size={patch_size} does not divide the input "
                                   f"size {h}x{w}; allowed: a common divisor of {h} and {w}")
        if int(dim) % int(heads):
            raise ModelConfigError(f"model.heads={heads} does not divide model.dim={dim}; "
                                   "allowed: a divisor of dim")
        self.patch_embed = nn.Conv2d(c, int(dim), p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, int(dim)))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (h // p) * (w // p), int(dim)) * 0.02)
        self.blocks = nn.ModuleList(Block(int(dim), int(heads), int(dim * mlp_ratio))
                                    for _ in range(int(depth)))
        self.norm = nn.LayerNorm(int(dim))
        self.head = nn.Linear(int(dim), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
