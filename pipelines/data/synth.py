"""Synthetic faces with known attributes, written in the CelebAMask-HQ layout.

The embedded default dataset and the yardstick for "did the model learn the condition": every face
is drawn from simple shapes whose attributes (skin tone, hair colour and length, eyeglasses, hat,
earrings, necklace, smile, cloth and background colour) are recorded, visible in the pixels, and
stated truthfully by ten captions.

One label map is painted first (parts in z-order, later shapes covering earlier ones); the image is
coloured from that same label map plus details drawn only inside their part (iris, teeth, lens tint,
shading), so image and masks agree pixel for pixel. Part masks are therefore disjoint and written at
the image's own size (the real dataset stores 512 masks for 1024 images; the reader accepts both).
Only parts present in a face get a file, as in the real dataset.

Output under ``out``::

    CelebA-HQ-img/{id}.jpg                                     RGB, size x size, quality 95, 4:4:4
    CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png   L, 0 or 255
    celeba-caption/{id}.txt                                    ten captions, one per line
    attributes.jsonl                                           one JSON object per id, in id order
    synth.json                                                 {n, size, seed, test_from, version}

``synth.json`` tells the reader the split (ids >= ``test_from`` are test) and marks a finished run.

Each face draws from its own generator seeded by ``(seed, id)``, so output bytes do not depend on
``workers``. Image-left parts get the ``l_`` labels (``l_eye``, ``l_brow``, ``l_ear``).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modeling.conditions import CLASS_NAMES
from pipelines.data.layouts import CELEBAMASK_PARTS

RGB = tuple[int, int, int]

SKIN_TONES: dict[str, RGB] = {
    "pale": (246, 224, 208),
    "fair": (232, 194, 165),
    "medium": (204, 158, 118),
    "olive": (176, 136, 92),
    "brown": (138, 94, 64),
    "dark": (92, 60, 42),
}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (28, 24, 24),
    "brown": (104, 64, 36),
    "blond": (226, 192, 112),
    "red": (172, 62, 30),
    "gray": (156, 156, 160),
}
# Background, cloth and hat colours: common colour words a caption (and a text encoder) knows.
NAMED_COLOURS: dict[str, RGB] = {
    "red": (200, 40, 40),
    "orange": (236, 132, 40),
    "yellow": (236, 212, 60),
    "green": (60, 150, 70),
    "teal": (30, 140, 140),
    "blue": (50, 90, 200),
    "purple": (122, 62, 162),
    "pink": (236, 142, 182),
    "white": (242, 242, 242),
    "gray": (128, 128, 128),
    "black": (30, 30, 30),
}
METALS: dict[str, RGB] = {"gold": (226, 182, 48), "silver": (206, 210, 220)}
HAIR_LENGTHS: tuple[str, ...] = ("short", "long", "bald")
_HAIR_LENGTH_P = (0.45, 0.45, 0.10)
_P_GLASSES, _P_HAT, _P_EARRINGS, _P_NECKLACE, _P_SMILING = 0.35, 0.25, 0.35, 0.3, 0.5
CAPTIONS_PER_FACE = 10
# Bump when drawing or captions change, so an old dataset is not mistaken for a current one.
SYNTH_VERSION = 1
LABEL = {name: i for i, name in enumerate(CLASS_NAMES)}

IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
CAPTION_DIR = "celeba-caption"
_OUTPUTS = (IMAGE_DIR, MASK_DIR, CAPTION_DIR, "attributes.jsonl", "synth.json")


@dataclass(frozen=True)
class FaceAttributes:
    skin_tone: str
    hair_color: str | None  # None when bald
    hair_length: str  # short | long | bald
    eyeglasses: bool
    hat: bool
    hat_color: str | None
    earrings: bool
    necklace: bool
    smiling: bool
    cloth_color: str
    background_color: str


def _dist(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _pick_colour(rng: np.random.Generator, avoid: list[tuple[RGB, float]]) -> str:
    """A named colour far enough from each ``(rgb, min_distance)`` so neighbouring parts stay distinct."""
    names = [n for n, c in NAMED_COLOURS.items() if all(_dist(c, a) >= d for a, d in avoid)]
    return names[rng.integers(len(names))]


def sample_attributes(rng: np.random.Generator) -> FaceAttributes:
    skin = list(SKIN_TONES)[rng.integers(len(SKIN_TONES))]
    length = HAIR_LENGTHS[rng.choice(len(HAIR_LENGTHS), p=_HAIR_LENGTH_P)]
    hair = None if length == "bald" else list(HAIR_COLOURS)[rng.integers(len(HAIR_COLOURS))]
    glasses, hat, earrings, necklace, smiling = (
        bool(rng.random() < p) for p in (_P_GLASSES, _P_HAT, _P_EARRINGS, _P_NECKLACE, _P_SMILING)
    )
    skin_rgb = SKIN_TONES[skin]
    hair_avoid = [] if hair is None else [(HAIR_COLOURS[hair], 110.0)]
    background = _pick_colour(rng, [(skin_rgb, 90.0), *hair_avoid])
    cloth = _pick_colour(rng, [(NAMED_COLOURS[background], 110.0), (skin_rgb, 70.0), *hair_avoid])
    hat_colour = _pick_colour(rng, [(NAMED_COLOURS[background], 110.0), (skin_rgb, 70.0), *hair_avoid]) if hat else None
    return FaceAttributes(
        skin_tone=skin,
        hair_color=hair,
        hair_length=length,
        eyeglasses=glasses,
        hat=hat,
        hat_color=hat_colour,
        earrings=earrings,
        necklace=necklace,
        smiling=smiling,
        cloth_color=cloth,
        background_color=background,
    )


# ---- drawing ---------------------------------------------------------------------------------


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _farthest_metal(against: list[RGB]) -> str:
    return max(METALS, key=lambda m: min(_dist(METALS[m], c) for c in against))


def render_face(attrs: FaceAttributes, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one face: ``(image HxWx3 uint8, label_map HxW uint8)`` that agree pixel for pixel.

    Coordinates are fractions of the image side, so geometry is the same at every size; strokes
    keep at least about one pixel of width at small sizes.
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    px = 1.0 / size
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(grid, grid)
    labels = np.zeros((size, size), dtype=np.uint8)
    # Colour overrides, each applied only where its part is still visible once painting is done.
    details: list[tuple[np.ndarray, RGB, str]] = []

    def paint(mask: np.ndarray, name: str) -> None:
        labels[mask] = LABEL[name]

    cx, cy = 0.5 + u(-0.04, 0.04), 0.44 + u(-0.03, 0.03)
    rx = u(0.18, 0.23)
    ry = rx * u(1.22, 1.38)
    shoulder_y = cy + ry + u(0.04, 0.08)
    neck_w = rx * u(0.5, 0.6)
    neckline_dip = u(0.04, 0.08)
    eye_y, eye_dx = cy - ry * u(0.05, 0.12), rx * u(0.38, 0.48)
    eye_w, eye_h = rx * u(0.16, 0.21), max(ry * u(0.055, 0.075), 1.2 * px)
    ear_dx, ear_y = rx * u(0.98, 1.04), cy + ry * u(-0.05, 0.05)
    ear_w, ear_h = rx * u(0.15, 0.19), ry * u(0.17, 0.22)
    hairline = cy - ry * u(0.42, 0.58)

    # Cloth: the top of an ellipse wider than the face, leaving the bottom edge of the image.
    paint(_ellipse(x, y, cx, shoulder_y + 0.3, u(0.36, 0.46), 0.3), "cloth")
    if attrs.hair_length == "long":
        hair_bottom = cy + ry * u(0.9, 1.25)
        back = _ellipse(x, y, cx, cy - 0.1 * ry, rx * 1.25, ry * 1.05)
        back |= (np.abs(x - cx) <= rx * 1.25) & (y >= cy - 0.1 * ry) & (y <= hair_bottom)
        paint(back, "hair")
    elif attrs.hair_length == "short":
        # Reaching below the hat brim at the temples, so the hair colour shows under any hat.
        paint(_ellipse(x, y, cx, cy - 0.12 * ry, rx * 1.2, ry * 0.98) & (y <= cy + 0.12 * ry), "hair")
    neck = (np.abs(x - cx) <= neck_w) & (y >= cy + 0.3 * ry) & (y <= shoulder_y)
    neck |= _ellipse(x, y, cx, shoulder_y, neck_w * u(1.2, 1.6), neckline_dip) & (y >= shoulder_y)
    paint(neck, "neck")
    for side, name in ((-1, "l_ear"), (1, "r_ear")):
        paint(_ellipse(x, y, cx + side * ear_dx, ear_y, ear_w, ear_h), name)
    # An egg rather than an ellipse: the jaw narrows below the cheeks.
    taper = 1.0 - 0.15 * np.clip((y - cy) / ry, 0.0, 1.0)
    face = ((x - cx) / (rx * taper)) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    paint(face, "skin")

    nose_top, nose_bottom, nose_w = eye_y + 0.05 * ry, cy + ry * u(0.25, 0.33), rx * u(0.14, 0.2)
    frac = np.clip((y - nose_top) / (nose_bottom - nose_top), 0.0, 1.0)
    nose = (y >= nose_top) & (y <= nose_bottom) & (np.abs(x - cx) <= max(nose_w, px) * frac**1.5 + 0.5 * px)
    nose |= _ellipse(x, y, cx, nose_bottom, nose_w, ry * 0.04)
    paint(nose, "nose")
    for side in (-1, 1):
        nostril = _ellipse(x, y, cx + side * nose_w * 0.45, nose_bottom + ry * 0.01, nose_w * 0.25, ry * 0.018)
        details.append((nostril, (60, 30, 24), "nose"))

    mouth_y, mouth_w = cy + ry * u(0.5, 0.58), rx * u(0.33, 0.42)
    t = (x - cx) / mouth_w
    curl = ry * (u(0.04, 0.07) if attrs.smiling else u(0.0, 0.015))
    dy = y - (mouth_y - curl * t**2)  # below the (curved) line between the lips when positive
    inside = np.abs(t) <= 1.0
    taper_t = np.sqrt(np.clip(1.0 - t**2, 0.0, 1.0))
    upper_t = max(ry * u(0.025, 0.04), px)
    upper = inside & (dy < 0) & (dy >= -upper_t * taper_t - 0.5 * px)
    if attrs.smiling:
        open_h, lower_t = ry * u(0.09, 0.13), max(ry * u(0.03, 0.045), px)
        inner = inside & (dy >= 0) & (dy <= open_h * taper_t)
        wide_t = t / 1.06
        lower = (np.abs(wide_t) <= 1.0) & (dy >= 0)
        lower &= dy <= (open_h + lower_t) * np.sqrt(np.clip(1.0 - wide_t**2, 0.0, 1.0)) + 0.5 * px
        paint(lower, "l_lip")
        paint(inner, "mouth")
        details.append((inner & (dy <= open_h * 0.35), (238, 234, 224), "mouth"))  # upper teeth
    else:
        lower = inside & (dy >= 0) & (dy <= max(ry * u(0.035, 0.05), px) * taper_t + 0.5 * px)
        paint(lower, "l_lip")
        details.append((lower & (dy < 0.6 * px), (92, 30, 36), "l_lip"))  # where the lips meet
    paint(upper, "u_lip")

    if attrs.hair_length != "bald":
        paint(_ellipse(x, y, cx, cy - 0.1 * ry, rx * 1.08, ry * 1.02) & (y < hairline), "hair")

    if attrs.hat:
        brim_y = cy - ry * u(0.48, 0.56)
        crown = _ellipse(x, y, cx, cy - 0.55 * ry, rx * u(1.1, 1.2), ry * u(0.55, 0.65)) & (y <= brim_y)
        brim = _ellipse(x, y, cx, brim_y, rx * u(1.3, 1.5), ry * u(0.07, 0.1))
        paint(crown | brim, "hat")
        band = crown & (y >= brim_y - ry * 0.08)
        details.append((band, tuple(int(c * 0.7) for c in NAMED_COLOURS[attrs.hat_color]), "hat"))

    if attrs.eyeglasses:
        lens_w, lens_h = eye_w * u(1.35, 1.55), eye_h * u(2.4, 2.8)
        frame_t = max(0.012, 1.1 * px)
        lens = np.zeros_like(face)
        frame = np.zeros_like(face)
        for side in (-1, 1):
            ex = cx + side * eye_dx
            inner_lens = _ellipse(x, y, ex, eye_y, lens_w, lens_h)
            lens |= inner_lens
            frame |= _ellipse(x, y, ex, eye_y, lens_w + frame_t, lens_h + frame_t) & ~inner_lens
        bar_y = eye_y - lens_h * 0.3
        frame |= (np.abs(x - cx) <= eye_dx - lens_w + frame_t) & (np.abs(y - bar_y) <= frame_t / 2)
        arm = (np.abs(x - cx) >= eye_dx + lens_w) & (np.abs(x - cx) <= rx * 1.02)
        frame |= arm & (np.abs(y - bar_y) <= frame_t / 2)
        paint(lens | frame, "eye_g")
        skin_rgb = np.array(SKIN_TONES[attrs.skin_tone])
        tint = tuple(int(v) for v in 0.65 * skin_rgb + 0.35 * np.array((175, 210, 245)))
        details.append((lens & ~frame, tint, "eye_g"))
        dark_skin = skin_rgb.mean() < 150
        details.append((frame, (206, 210, 220) if dark_skin else (24, 24, 28), "eye_g"))

    iris_rgb = [(70, 45, 25), (60, 110, 170), (70, 120, 70), (40, 30, 25)][rng.integers(4)]
    brow_y = eye_y - ry * u(0.13, 0.17)
    brow_w, brow_t, arch = rx * u(0.2, 0.25), max(ry * 0.025, 0.6 * px), ry * 0.03
    for side, eye_name, brow_name in ((-1, "l_eye", "l_brow"), (1, "r_eye", "r_brow")):
        ex = cx + side * eye_dx
        eye = _ellipse(x, y, ex, eye_y, eye_w, eye_h)
        paint(eye, eye_name)
        iris_x = ex + u(-0.2, 0.2) * eye_w
        details.append((_ellipse(x, y, iris_x, eye_y, eye_h, eye_h), iris_rgb, eye_name))
        details.append((_ellipse(x, y, iris_x, eye_y, eye_h * 0.45, eye_h * 0.45), (8, 8, 8), eye_name))
        bt = (x - ex) / brow_w
        paint((np.abs(bt) <= 1.0) & (np.abs(y - (brow_y + arch * bt**2)) <= brow_t), brow_name)

    skin_rgb = SKIN_TONES[attrs.skin_tone]
    hair_rgb = HAIR_COLOURS[attrs.hair_color] if attrs.hair_color else (60, 42, 30)
    if attrs.earrings:
        ring_r = max(rx * 0.06, 1.3 * px)
        for side in (-1, 1):
            lobe_x, lobe_y = cx + side * ear_dx, ear_y + ear_h * 0.85
            paint(_ellipse(x, y, lobe_x, lobe_y + ring_r * 1.2, ring_r, ring_r * 1.4), "ear_r")
    if attrs.necklace:
        chain_t = max(0.012, 1.2 * px)
        top = shoulder_y - 0.05
        depth = shoulder_y + neckline_dip * 0.6 - top
        outer = _ellipse(x, y, cx, top, neck_w * 1.05 + chain_t / 2, depth + chain_t / 2)
        chain = outer & ~_ellipse(x, y, cx, top, neck_w * 1.05 - chain_t / 2, depth - chain_t / 2) & (y >= top)
        chain |= _ellipse(x, y, cx, top + depth + chain_t, chain_t * 1.5, chain_t * 1.8)
        paint(chain, "neck_l")

    table = np.zeros((len(CLASS_NAMES), 3), dtype=np.float32)
    table[LABEL["background"]] = NAMED_COLOURS[attrs.background_color]
    table[LABEL["skin"]] = skin_rgb
    table[LABEL["nose"]] = np.multiply(skin_rgb, 0.88)
    table[[LABEL["l_eye"], LABEL["r_eye"]]] = (240, 240, 234)
    table[[LABEL["l_brow"], LABEL["r_brow"]]] = np.multiply(hair_rgb, 0.8)
    table[[LABEL["l_ear"], LABEL["r_ear"]]] = np.multiply(skin_rgb, 0.94)
    table[LABEL["mouth"]] = (112, 26, 36)
    lip = 0.45 * np.array(skin_rgb) + 0.55 * np.array((192, 72, 82))
    table[LABEL["u_lip"]] = lip * 0.9
    table[LABEL["l_lip"]] = lip
    table[LABEL["hair"]] = hair_rgb
    if attrs.hat_color:
        table[LABEL["hat"]] = NAMED_COLOURS[attrs.hat_color]
    table[LABEL["ear_r"]] = METALS[_farthest_metal([skin_rgb, hair_rgb, NAMED_COLOURS[attrs.background_color]])]
    table[LABEL["neck_l"]] = METALS[_farthest_metal([skin_rgb, NAMED_COLOURS[attrs.cloth_color]])]
    table[LABEL["neck"]] = np.multiply(skin_rgb, 0.9)
    table[LABEL["cloth"]] = NAMED_COLOURS[attrs.cloth_color]
    image = table[labels]
    for mask, colour, part in details:
        image[mask & (labels == LABEL[part])] = colour

    # Gentle shading and texture so the faces are not flat cut-outs; all multiplicative and small,
    # so every part keeps its named colour.
    shade = np.ones((size, size), dtype=np.float32)
    skin_parts = np.isin(labels, [LABEL[n] for n in ("skin", "nose", "l_ear", "r_ear")])
    radial = np.clip(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2, 0.0, 1.0)
    shade[skin_parts] = (1.0 - 0.14 * radial**2)[skin_parts]
    is_neck = labels == LABEL["neck"]
    shade[is_neck] = (0.86 + 0.12 * np.clip((y - cy - 0.5 * ry) / (shoulder_y - cy), 0.0, 1.0))[is_neck]
    is_hair = labels == LABEL["hair"]
    phase = u(0.0, 2 * np.pi)
    strands = 1.0 + 0.08 * np.sin(2 * np.pi * (x - cx) * size / 3.0 + phase + 6.0 * y)
    shade[is_hair] = strands[is_hair]
    is_bg = labels == LABEL["background"]
    shade[is_bg] = (1.04 - 0.1 * y)[is_bg]
    image *= shade[..., None]
    image += rng.normal(0.0, 2.5, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


# ---- captions --------------------------------------------------------------------------------


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def captions_for(attrs: FaceAttributes, rng: np.random.Generator, n: int = CAPTIONS_PER_FACE) -> list[str]:
    """``n`` captions in different templates and orders; each states only true attributes.

    Every caption names the hair (colour and length, or bald). Other attributes appear at random;
    absent accessories are sometimes stated as absent, always as "no <accessory>". Expressions of
    non-smiling faces never contain "smil", so a caption's smile claim is easy to check.
    """

    def pick(options: list[str]) -> str:
        return options[rng.integers(len(options))]

    def hair() -> str:
        if attrs.hair_length == "bald":
            return pick(["a bald head", "a completely bald head", "no hair at all, a bald head"])
        c, length = attrs.hair_color, attrs.hair_length
        worn = "cut short" if length == "short" else "worn long"
        return pick([f"{length} {c} hair", f"{c} hair {worn}", f"{length}, {c} hair"])

    def skin() -> str:
        t = attrs.skin_tone
        article = "an" if t[0] in "aeiou" else "a"
        return pick([f"{t} skin", f"{article} {t} complexion", f"{t}-toned skin"])

    def expression_noun() -> str:
        if attrs.smiling:
            return pick(["a big smile", "a wide, open smile", "a happy smile with visible teeth"])
        return pick(["a neutral expression", "closed lips and a calm face", "a serious expression"])

    def expression_adjective() -> str:
        return "smiling" if attrs.smiling else pick(["calm-looking", "serious-looking"])

    present = {
        "eyeglasses": (
            attrs.eyeglasses,
            ["eyeglasses", "glasses", "a pair of glasses"],
            ["no eyeglasses", "no glasses"],
        ),
        "hat": (attrs.hat, [f"a {attrs.hat_color} hat"], ["no hat"]),
        "earrings": (attrs.earrings, ["earrings", "a pair of earrings", "shiny earrings"], ["no earrings"]),
        "necklace": (attrs.necklace, ["a necklace", "a thin necklace"], ["no necklace"]),
    }
    c = attrs.cloth_color
    cloth_options = [f"a {c} shirt", f"{c} clothes", f"a {c} top"]
    b = attrs.background_color
    bg_options = [f"against a {b} background", f"in front of a {b} background", f"on a plain {b} background"]

    captions = []
    for template in rng.permutation(n) % 10:
        has = [hair()]
        if rng.random() < 0.6:
            has.append(skin())
        mode = rng.choice(["noun", "adjective", "none"], p=[0.4, 0.35, 0.25])
        adjective = expression_adjective() + " " if mode == "adjective" else ""
        if mode == "noun":
            has.append(expression_noun())
        wears, nots = [], []
        for on, yes, no in present.values():
            if on and rng.random() < 0.8:
                wears.append(pick(yes))
            elif not on and rng.random() < 0.3:
                nots.append(pick(no))
        if rng.random() < 0.5:
            wears.append(pick(cloth_options))
        bg = pick(bg_options) if rng.random() < 0.5 else ""
        for items in (has, wears, nots):
            order = rng.permutation(len(items))
            items[:] = [items[i] for i in order]
        captions.append(_fill(int(template), adjective, has, wears, nots, bg))
    return captions


def full_caption(attrs: dict[str, Any]) -> str:
    """One caption that states every colour attribute of a face (an ``attributes.jsonl`` row): what the
    synthetic yardstick prompts with, so each attribute it reads back from the pixels was asked for."""
    if attrs["hair_length"] == "bald":
        hair = "a bald head"
    else:
        hair = f"{attrs['hair_length']} {attrs['hair_color']} hair"
    wears = [f"a {attrs['cloth_color']} shirt"]
    if attrs["hat"]:
        wears.append(f"a {attrs['hat_color']} hat")
    if attrs["eyeglasses"]:
        wears.append("eyeglasses")
    return (
        f"A person with {hair} and {attrs['skin_tone']} skin, wearing {_and(wears)}, "
        f"against a {attrs['background_color']} background."
    )


def _fill(template: int, adjective: str, has: list[str], wears: list[str], nots: list[str], bg: str) -> str:
    h = _and(has)
    w = _and(wears) if wears else ""
    no = _and(nots) if nots else ""
    if template == 0:
        text = f"A {adjective}person with {h}"
        text += f", wearing {w}" if w else ""
        text += f", with {no}" if no else ""
        return text + (f", {bg}." if bg else ".")
    if template == 1:
        text = f"This {adjective}person has {h}."
        text += f" They are wearing {w}." if w else ""
        text += f" They have {no}." if no else ""
        return text + (f" The photo is taken {bg}." if bg else "")
    if template == 2:
        text = f"Portrait of a {adjective}person with {h}"
        text += f", who wears {w}" if w else ""
        text += f"; {no}" if no else ""
        return text + (f", {bg}." if bg else ".")
    if template == 3:
        parts = [h, *([w] if w else []), *([no] if no else [])]
        return f"Close-up headshot{' ' + bg if bg else ''}: " + "; ".join(parts) + "."
    if template == 4:
        text = f"The face of a {adjective}person{' ' + bg if bg else ''}, with {h}"
        text += f" and {w}" if w else ""
        return text + "." + (f" {_cap(no)}." if no else "")
    if template == 5:
        text = f"Someone {adjective.strip() + ' ' if adjective else ''}with {h}"
        text += f" is wearing {w}" if w else " is shown"
        text += f" and has {no}" if no else ""
        return text + (f", {bg}." if bg else ".")
    if template == 6:
        text = f"A {adjective}face with {h}"
        text += f"; the person wears {w}" if w else ""
        text += f" and {no}" if no else ""
        return text + (f", {bg}." if bg else ".")
    if template == 7:
        text = f"A portrait{' ' + bg if bg else ''} of a {adjective}person showing {h}"
        text += f", {w}" if w else ""
        return text + (f", {no}." if no else ".")
    if template == 8:
        text = f"An image of a {adjective}person{' ' + bg if bg else ''}. Features: {h}"
        text += f", {w}" if w else ""
        return text + (f", {no}." if no else ".")
    text = _cap(h) + (f"; wearing {w}" if w else "") + (f"; {no}" if no else "")
    return text + f". A {adjective}person" + (f" photographed {bg}." if bg else ".")


# ---- writing the dataset ---------------------------------------------------------------------


def _write_face(out: Path, size: int, seed: int, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    image, labels = render_face(attrs, rng, size)
    captions = captions_for(attrs, rng)
    Image.fromarray(image).save(out / IMAGE_DIR / f"{index}.jpg", quality=95, subsampling=0)
    mask_dir = out / MASK_DIR / str(index // 2000)
    label_image = Image.fromarray(labels)
    counts = np.bincount(labels.ravel(), minlength=len(CLASS_NAMES))
    for label, part in enumerate(CELEBAMASK_PARTS, start=1):
        if counts[label]:
            part_mask = label_image.point([255 if v == label else 0 for v in range(256)])
            part_mask.save(mask_dir / f"{index:05d}_{part}.png")
    (out / CAPTION_DIR / f"{index}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return {"id": str(index), **asdict(attrs), "captions": captions}


def synthesize(
    out: str | Path,
    n: int,
    size: int = 128,
    seed: int = 0,
    test_fraction: float = 0.1,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``n`` synthetic faces in the CelebAMask-HQ layout under ``out``; returns the summary.

    ``synth.json`` is written last, so it marks a finished dataset: when it already records the same
    request, the folder is reused as it is (``"reused": True``). Any other non-empty ``out`` is refused
    unless ``overwrite`` is set, because stale part files from an earlier run would silently join
    the new masks.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(out)
    test_from = n - int(round(n * test_fraction))
    meta = {"n": n, "size": size, "seed": seed, "test_from": test_from, "version": SYNTH_VERSION}
    summary = {**meta, "out": str(out), "n_train": test_from, "n_test": n - test_from}
    if not overwrite and _finished_meta(out) == meta:
        return {**summary, "reused": True}
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new folder or pass overwrite=True")
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for folder in (IMAGE_DIR, CAPTION_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for group in range((n - 1) // 2000 + 1):
        (out / MASK_DIR / str(group)).mkdir(parents=True, exist_ok=True)

    write = partial(_write_face, out, size, seed)
    if workers > 1:
        # spawn, not fork: the caller may be a threaded process (a Ray worker, a test runner).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            records = list(pool.imap(write, range(n), chunksize=max(1, min(64, n // (4 * workers)))))
    else:
        records = [write(i) for i in range(n)]

    with open(out / "attributes.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {**summary, "reused": False}


def _finished_meta(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "synth.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def attributes_of(out: str | Path) -> dict[str, dict[str, Any]]:
    """``attributes.jsonl`` of a synthetic dataset, keyed by record id."""
    path = Path(out) / "attributes.jsonl"
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {row["id"]: row for row in rows}
