"""Fixed 2D sin-cos position embeddings (as in MAE), with a zero cls position."""
from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N, dim): ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-i / (dim/2))``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double().reshape(-1, 1) * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> Tensor:
    """(1 [+1], H*W, dim) float32: half the channels encode the column, half the row; cls gets zeros."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()[None]
