"""The CelebAMask-HQ vocabulary every layout maps onto: 19 classes, their colours, their part files.

Label maps are ``uint8`` HxW arrays holding class indices 0..18 (SPEC.md, "Shared vocabulary").
Colour-coded masks paint class ``k`` with ``CELEBAMASK_COLORS[k]``.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
    "hair",
    "hat",
    "ear_r",
    "neck_l",
    "neck",
    "cloth",
)
NUM_CLASSES = len(CLASS_NAMES)

CELEBAMASK_COLORS: np.ndarray = np.array(
    [
        (0, 0, 0),
        (204, 0, 0),
        (76, 153, 0),
        (204, 204, 0),
        (51, 51, 255),
        (204, 0, 204),
        (0, 255, 255),
        (255, 204, 204),
        (102, 51, 0),
        (255, 0, 0),
        (102, 204, 0),
        (255, 255, 0),
        (0, 0, 153),
        (0, 0, 204),
        (255, 51, 153),
        (0, 204, 204),
        (0, 51, 0),
        (255, 153, 51),
        (0, 204, 0),
    ],
    dtype=np.uint8,
)
CELEBAMASK_COLORS.setflags(write=False)

# Part files of CelebAMask-HQ-mask-anno, in label order 1..18: ``{id:05d}_{part}.png``.
CELEBAMASK_PARTS: tuple[str, ...] = CLASS_NAMES[1:]


def labels_to_color(label_map: np.ndarray) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 colour-coded mask."""
    label_map = np.asarray(label_map)
    if label_map.size and int(label_map.max()) >= NUM_CLASSES:
        raise ValueError(f"label values must be in 0..{NUM_CLASSES - 1}, got max {int(label_map.max())}")
    return CELEBAMASK_COLORS[label_map]


def color_to_labels(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 colour-coded mask -> HxW class indices, each pixel taking the nearest palette colour.

    Nearest (not exact) matching so masks that went through resampling or lossy compression still
    decode. Distances are computed once per distinct colour, not per pixel: a mask has few colours.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 colour mask, got shape {rgb.shape}")
    flat = rgb.reshape(-1, 3).astype(np.int32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    unique_rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1)
    dist = ((unique_rgb[:, None, :] - CELEBAMASK_COLORS[None, :, :].astype(np.int32)) ** 2).sum(axis=2)
    return dist.argmin(axis=1).astype(np.uint8)[inverse.reshape(-1)].reshape(rgb.shape[:2])
