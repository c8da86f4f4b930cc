"""Example conditions that travel with a published model: a few held-out masks, sketches and captions.

``faceforge publish`` writes them into an ``examples/`` folder logged beside the weights; the Serve page offers
them as one-click starting points, and Face-MoGLE uses one of them as its **default layout**: the face layout
that stands in when a request brings no mask (its condition branch needs one, and an all-background mask draws
only background). The default layout is the *most typical* mask of the held-out pool: the one that agrees, pixel
by pixel, most with all the others (the medoid under pixel agreement). It is always example 0.

Folder layout::

    examples/examples.json   {"default_layout": 0, "examples": [{"id", "caption", "mask", "sketch"}, ...], "source"}
    examples/mask-K.png      colour-coded (CelebAMask-HQ colours), the model's resolution
    examples/sketch-K.png    dark lines on white (only for models that take sketches)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeling.conditions import NUM_CLASSES, labels_to_color, mask_to_labels

EXAMPLES_FILE = "examples.json"


@dataclass
class Example:
    id: str
    caption: str
    mask: np.ndarray  # (S, S) uint8 labels 0..18
    sketch: np.ndarray | None = None  # (S, S) uint8, dark lines on white


@dataclass
class ExampleSet:
    examples: list[Example]
    default_layout: int | None = 0  # the index whose mask stands in for a missing one; None: no default
    source: dict | None = None  # where they were drawn from (data folder, split), for the record

    @property
    def layout(self) -> np.ndarray | None:
        return None if self.default_layout is None else self.examples[self.default_layout].mask


def most_typical(masks: np.ndarray) -> int:
    """Index of the mask that agrees most, pixel by pixel, with all the others (``masks``: (N, S, S) labels).

    Agreement of mask ``i`` with the pool = sum over pixels of how many masks share its label there, so it is
    computed from per-pixel class counts in O(N S²) instead of comparing every pair."""
    masks = np.asarray(masks, np.int64)
    n, h, w = masks.shape
    counts = np.zeros((NUM_CLASSES, h, w), np.int64)
    for label in range(NUM_CLASSES):
        counts[label] = (masks == label).sum(0)
    agreement = np.take_along_axis(counts, masks, axis=0)  # [i, y, x] = masks sharing mask i's label at (y, x)
    return int(agreement.reshape(n, -1).sum(1).argmax())


def save_examples(folder: str | Path, examples: ExampleSet) -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, example in enumerate(examples.examples):
        entry = {"id": example.id, "caption": example.caption, "mask": f"mask-{k}.png", "sketch": None}
        Image.fromarray(labels_to_color(example.mask)).save(folder / entry["mask"])
        if example.sketch is not None:
            entry["sketch"] = f"sketch-{k}.png"
            Image.fromarray(example.sketch).save(folder / entry["sketch"])
        entries.append(entry)
    meta = {"default_layout": examples.default_layout, "examples": entries, "source": examples.source}
    (folder / EXAMPLES_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_examples(folder: str | Path) -> ExampleSet:
    """The examples of ``folder`` (written by ``save_examples``); ``FileNotFoundError`` naming what is missing."""
    from PIL import Image

    folder = Path(folder)
    meta_path = folder / EXAMPLES_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no example conditions (publish the model again with faceforge)")
    meta = json.loads(meta_path.read_text())
    examples = []
    for entry in meta["examples"]:
        mask = mask_to_labels(np.asarray(Image.open(folder / entry["mask"]).convert("RGB")))
        sketch = None
        if entry.get("sketch"):
            sketch = np.asarray(Image.open(folder / entry["sketch"]).convert("L"))
        examples.append(Example(str(entry["id"]), entry["caption"], mask, sketch))
    return ExampleSet(examples, meta.get("default_layout"), meta.get("source"))
