"""The synthetic yardstick: how well generated faces follow their mask and their caption, with no pretrained judge.

Synthetic faces have known attributes, so conditioning is measured directly:

- **mask adherence**: the synthetic parser (trained by faceforge on renders, >= 0.95 pixel accuracy) labels the
  generated image; ``miou`` is the mean over classes present in the conditioning masks of IoU = TP / (TP + FP +
  FN), accumulated over all evaluated images (one confusion matrix, as segmentation benchmarks do);
  ``mask_acc`` the fraction of pixels whose parse equals the mask.
- **text adherence**: each colour attribute the prompt states (hair, background, cloth, hat, skin) is read back
  from the generated pixels inside that part's region of the *conditioning* mask: the median colour there,
  matched to the nearest colour of the attribute's palette. Accuracy = fraction read back as stated.

Every figure comes with two baselines: ``chance`` (uniform guessing: 1/19 for mIoU as the issue's rule of
thumb, 1/K for an attribute with K values) and ``shuffled`` (each mask or caption scored against the image
generated for *another* sample: what a generator that ignores its conditions but draws plausible faces gets).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modeling.conditions import CLASS_NAMES, NUM_CLASSES
from pipelines.data.synth import HAIR_COLOURS, NAMED_COLOURS, SKIN_TONES

LABEL = {name: i for i, name in enumerate(CLASS_NAMES)}
# attribute -> (the part whose pixels carry it, its palette)
ATTRIBUTES: dict[str, tuple[int, dict]] = {
    "hair_color": (LABEL["hair"], HAIR_COLOURS),
    "background_color": (LABEL["background"], NAMED_COLOURS),
    "cloth_color": (LABEL["cloth"], NAMED_COLOURS),
    "hat_color": (LABEL["hat"], NAMED_COLOURS),
    "skin_tone": (LABEL["skin"], SKIN_TONES),
}
MIN_REGION_PIXELS = 3  # a part this small in the mask says nothing about a colour


def confusion(target: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(19, 19) counts, rows = the conditioning mask's class, columns = the parser's."""
    index = target.reshape(-1).astype(np.int64) * NUM_CLASSES + predicted.reshape(-1).astype(np.int64)
    return np.bincount(index, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes present in the target (rows with any pixel)."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = matrix.sum(1) > 0
    return float((tp[present] / np.maximum(union[present], 1)).mean())


def read_attribute(image: np.ndarray, region: np.ndarray, palette: dict) -> str | None:
    """The palette name nearest to the median colour of ``image`` inside ``region``; None for a tiny region."""
    if region.sum() < MIN_REGION_PIXELS:
        return None
    median = np.median(image[region].reshape(-1, 3).astype(np.float64), axis=0)
    names = list(palette)
    colours = np.array([palette[n] for n in names], np.float64)
    return names[int(((colours - median) ** 2).sum(1).argmin())]


def _attribute_hits(images, labels, attributes, pairing, regions_of_image: bool = False) -> dict[str, list[bool]]:
    """Per attribute, whether image j shows what caption i states, read inside the part's region of mask i
    (``regions_of_image``: of ``labels[j]``, the parse of image j itself, when there was no mask)."""
    hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    for i, j in pairing:
        for name, (part, palette) in ATTRIBUTES.items():
            stated = attributes[i].get(name)
            if stated is None:
                continue
            got = read_attribute(images[j], labels[j if regions_of_image else i] == part, palette)
            if regions_of_image:  # a stated part the image does not draw counts as a miss
                hits[name].append(got == stated)
            elif got is not None:
                hits[name].append(got == stated)
    return hits


def score(images: np.ndarray, labels: np.ndarray, parsed: np.ndarray, attributes: list[dict[str, Any]]) -> dict:
    """The yardstick of generated ``images`` (N, S, S, 3) uint8 conditioned on ``labels`` (N, S, S) and on
    captions stating ``attributes``; ``parsed`` = the synthetic parser's labels of the images."""
    n = len(images)
    if n < 2:
        raise ValueError("the yardstick needs at least 2 generated images (the shuffled baseline pairs them)")
    shifted = [(i, (i + 1) % n) for i in range(n)]
    matrix = confusion(labels, parsed)
    shuffled = confusion(labels, parsed[[(i + 1) % n for i in range(n)]])
    result: dict = {
        "n": n,
        "miou": round(mean_iou(matrix), 4),
        "miou_chance": round(1 / NUM_CLASSES, 4),
        "miou_shuffled": round(mean_iou(shuffled), 4),
        "mask_acc": round(float(np.trace(matrix) / matrix.sum()), 4),
        "mask_acc_shuffled": round(float(np.trace(shuffled) / shuffled.sum()), 4),
        "attributes": {},
    }
    own = _attribute_hits(images, labels, attributes, [(i, i) for i in range(n)])
    other = _attribute_hits(images, labels, attributes, shifted)
    for name, (_, palette) in ATTRIBUTES.items():
        result["attributes"][name] = {
            "accuracy": round(float(np.mean(own[name])), 4) if own[name] else None,
            "n": len(own[name]),
            "chance": round(1 / len(palette), 4),
            "shuffled": round(float(np.mean(other[name])), 4) if other[name] else None,
        }
    return result


# a parse "is a face" when skin and hair are both there and the face (all but background) is a real part of it
FACE_MIN_SKIN, FACE_MIN_HAIR, FACE_MIN_FOREGROUND = 0.04, 0.02, 0.15


def is_face(parsed: np.ndarray) -> bool:
    """Whether the parser found a face in an image (``parsed``: its (S, S) labels), not background or noise."""
    area = parsed.size
    return bool(
        (parsed == LABEL["skin"]).sum() >= FACE_MIN_SKIN * area
        and (parsed == LABEL["hair"]).sum() >= FACE_MIN_HAIR * area
        and (parsed != LABEL["background"]).sum() >= FACE_MIN_FOREGROUND * area
    )


def face_coverage(parsed: np.ndarray, mask: np.ndarray) -> float:
    """Share of the mask's face region (every class but background) that the parser also finds as face."""
    region = mask != LABEL["background"]
    return float((parsed[region] != LABEL["background"]).mean()) if region.any() else 0.0


def score_text_only(images: np.ndarray, parsed: np.ndarray, attributes: list[dict[str, Any]]) -> dict:
    """The yardstick of images generated from captions alone: how many are faces (``face_rate``), and each
    stated colour read back inside the region where the parser finds that part in the image itself."""
    n = len(images)
    if n < 2:
        raise ValueError("the yardstick needs at least 2 generated images (the shuffled baseline pairs them)")
    own = _attribute_hits(images, parsed, attributes, [(i, i) for i in range(n)], regions_of_image=True)
    other = _attribute_hits(images, parsed, attributes, [(i, (i + 1) % n) for i in range(n)], regions_of_image=True)
    result: dict = {"n": n, "mode": "text", "face_rate": round(float(np.mean([is_face(p) for p in parsed])), 4)}
    result["attributes"] = {
        name: {
            "accuracy": round(float(np.mean(own[name])), 4) if own[name] else None,
            "n": len(own[name]),
            "chance": round(1 / len(palette), 4),
            "shuffled": round(float(np.mean(other[name])), 4) if other[name] else None,
        }
        for name, (_, palette) in ATTRIBUTES.items()
    }
    return result


def flat_metrics(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """The yardstick as MLflow metrics: eval/miou, eval/miou_chance, eval/hair_color_acc, ..."""
    out = {f"{prefix}{k}": float(v) for k, v in result.items() if isinstance(v, (int, float)) and k != "n"}
    for name, entry in result["attributes"].items():
        for key, suffix in (("accuracy", "acc"), ("chance", "chance"), ("shuffled", "shuffled")):
            if entry[key] is not None:
                out[f"{prefix}{name}_{suffix}"] = float(entry[key])
    return out
