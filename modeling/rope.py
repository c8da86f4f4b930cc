"""Rotary position embeddings as plain functions (no parameters).

A token at position ``p`` has its query/key rotated, pair by pair, by angles ``p * f_i``; the dot
product of a rotated query and key then depends only on the *difference* of their positions. For
images the head dimension is split into one block per axis (2-D axial RoPE: the first half of the
pairs encode the row, the second half the column); text uses one axis over the whole head.

Layout: pair ``i`` is made of channels ``i`` and ``i + D/2`` ("rotate half"), so applying RoPE is two
fused multiply-adds on contiguous halves rather than a strided view of interleaved pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def axial_positions(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(height*width, 2) float (row, col) of each image token in raster order."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(height * width, 2)


def sequence_positions(length: int, device: torch.device | None = None) -> Tensor:
    """(length, 1) float position of each text token."""
    return torch.arange(length, device=device, dtype=torch.float32)[:, None]


def rope_angles(positions: Tensor, axes_dims: Sequence[int], theta: float = 10_000.0) -> Tensor:
    """Rotation angles (N, sum(axes_dims)/2) for positions (N, len(axes_dims)).

    Axis ``a`` owns ``axes_dims[a]`` head channels, i.e. ``axes_dims[a]/2`` rotation pairs with
    frequencies ``theta ** (-2i / axes_dims[a])``.
    """
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes but axes_dims is {tuple(axes_dims)}")
    parts = []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"each RoPE axis needs an even number of channels, got {tuple(axes_dims)}")
        exponent = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
        freqs = (theta ** (-exponent)).to(torch.float32)
        parts.append(positions[:, axis, None].float() * freqs[None, :])
    return torch.cat(parts, dim=-1)


def rope_cos_sin(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (N, D) in rotate-half layout, ready for ``apply_rope``."""
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., N, D) by tables (N, D): ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.addcmul(x * cos, rotated, sin)
