"""A small Vision Transformer for the benchmark (issue 4's ``vit_tiny`` is not on this branch).

Every projection is an ``nn.Linear`` (LoRA targets with ``target_modules: [all]``).
Digits arrive flattened (64 values): they are viewed as 1x8x8 images, cut into 2x2
patches (16 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """ViT: patch embedding, ``depth`` pre-norm blocks, mean-pooled linear head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, image_size: int = 8,
                 channels: int = 1, patch: int = 2, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        self.image = (channels, image_size, image_size)
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image
        p = self.patch
        x = x.reshape(-1, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(x.reshape(x.shape[0], -1, c * p * p)) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))
