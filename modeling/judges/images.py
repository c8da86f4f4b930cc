"""The image convention every judge accepts, and the resizes and normalisations they share.

Judges take ``(N, 3, H, W)`` RGB batches, either ``uint8`` in [0, 255] or floating point in [0, 1]; each converts
to what its network was trained on (value range, size, mean/std) itself, so callers never do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit(images: Tensor) -> Tensor:
    """``(N, 3, H, W)`` uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images shaped (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    # A [-1, 1] or [0, 255] float batch would silently give wrong scores; catch it here (small slack for rounding).
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; pass uint8 or rescale")
    return images.float().clamp(0.0, 1.0)


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a float batch; antialiased when shrinking (as PIL does), a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel ``(x - mean) / std`` of a [0, 1] batch."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
