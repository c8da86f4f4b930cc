"""What a spatial condition is: the 19 CelebAMask-HQ classes, their colours, and the images the models see.

Label maps are ``uint8`` HxW arrays of class indices 0..18 (SPEC.md, "Shared vocabulary"). Colour-coded
masks paint class ``k`` with ``CELEBAMASK_COLORS[k]``. Both the precompute (``pipelines``) and serving
(``serve``) turn a label map into model inputs through this module, so training and generation see the
same pixels: the colour-coded global mask (MMFace-DiT's mask condition, MoGLE's global expert) and one
binary mask per class (MoGLE's 19 local experts).

numpy + PIL only (no torch): the Serve ingress validates uploaded masks with it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

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
NUM_CONDITION_IMAGES = 1 + NUM_CLASSES  # MoGLE: the global colour mask + one binary mask per class

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

# how far (RGB euclidean) a pixel of an uploaded colour mask may be from its palette colour: lossy
# compression and resampling blur edges by a few levels, an unknown colour is further than this
COLOR_TOLERANCE = 40.0


class MaskError(ValueError):
    """A mask that cannot be read as CelebAMask-HQ labels; the message says what is wrong with it."""


def labels_to_color(label_map: np.ndarray) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 colour-coded mask."""
    label_map = np.asarray(label_map)
    if label_map.size and int(label_map.max()) >= NUM_CLASSES:
        raise ValueError(f"label values must be in 0..{NUM_CLASSES - 1}, got max {int(label_map.max())}")
    return CELEBAMASK_COLORS[label_map]


def _palette_distances(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct colours (K,3), index of each pixel's colour, (K,19) squared distances to the palette)."""
    flat = rgb.reshape(-1, 3).astype(np.int32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    unique_rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1)
    dist = ((unique_rgb[:, None, :] - CELEBAMASK_COLORS[None, :, :].astype(np.int32)) ** 2).sum(axis=2)
    return unique_rgb, inverse.reshape(-1), dist


def color_to_labels(rgb: np.ndarray, tolerance: float | None = None) -> np.ndarray:
    """HxWx3 colour-coded mask -> HxW class indices, each pixel taking the nearest palette colour.

    Nearest (not exact) matching so masks that went through resampling or lossy compression still
    decode. Distances are computed once per distinct colour, not per pixel: a mask has few colours.
    With ``tolerance``, a colour further than that from every palette colour is a ``MaskError`` that
    names the colours (a photo uploaded as a mask, a palette from another dataset).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 colour mask, got shape {rgb.shape}")
    unique_rgb, inverse, dist = _palette_distances(rgb)
    if tolerance is not None:
        unknown = unique_rgb[dist.min(axis=1) > tolerance**2]
        if len(unknown):
            shown = ", ".join(f"({r},{g},{b})" for r, g, b in unknown[:5].tolist())
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise MaskError(
                f"mask has {len(unknown)} colour(s) that are not CelebAMask-HQ class colours: {shown}{more}; "
                "paint with the 19 class colours or send a label map (grey values 0..18)"
            )
    return dist.argmin(axis=1).astype(np.uint8)[inverse].reshape(rgb.shape[:2])


def mask_to_labels(image: np.ndarray) -> np.ndarray:
    """An uploaded mask as a label map: a grey image is a label map (values 0..18), an RGB(A) image a
    colour-coded mask (palette colours within ``COLOR_TOLERANCE``). ``MaskError`` names what does not fit."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[2] == 3:
        if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all() and image.max() < 19:
            image = image[..., 0]  # a label map saved as RGB
        else:
            return color_to_labels(image, tolerance=COLOR_TOLERANCE)
    if image.ndim != 2:
        raise MaskError(f"a mask must be a grey label map or an RGB colour mask, got an array of shape {image.shape}")
    values = np.unique(image)
    bad = values[values >= NUM_CLASSES]
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:8].tolist())
        raise MaskError(
            f"label map has value(s) {shown} outside the 19 classes 0..18; "
            "send labels 0..18 or a colour-coded mask (RGB, CelebAMask-HQ colours)"
        )
    return image.astype(np.uint8)


def as_sketch(image: np.ndarray) -> np.ndarray:
    """An uploaded sketch as HxW uint8 (dark lines on white); colour images are averaged to grey."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3].mean(-1)
    return image.astype(np.uint8)


def center_square(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return array[top : top + side, left : left + side]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 (or HxW) uint8 -> size x size, centre-cropped to square first, bicubic."""
    image = center_square(image)
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def resize_labels(label_map: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize keeps every value a valid class id."""
    label_map = center_square(label_map)
    if label_map.shape[0] == size:
        return label_map
    return np.asarray(Image.fromarray(label_map).resize((size, size), Image.NEAREST))


def decouple_mask(label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H,W) labels -> (colour-coded (H,W,3) uint8, binary (19,H,W) bool, one per class incl. background)."""
    binary = label_map[None, :, :] == np.arange(NUM_CLASSES, dtype=label_map.dtype)[:, None, None]
    return labels_to_color(label_map), binary


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def mogle_condition_images(label_map: np.ndarray) -> np.ndarray:
    """(20, H, W, 3) uint8: the colour-coded global mask, then the white-on-black binary mask of each class."""
    colour, binary = decouple_mask(label_map)
    binary_rgb = np.repeat((binary.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return np.concatenate([colour[None], binary_rgb], axis=0)
