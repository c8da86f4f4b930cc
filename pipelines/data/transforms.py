"""Per-record transforms between a raw ``FaceRecord`` and what the codec and text encoder see.

Resizing and mask decoupling live in ``modeling.conditions`` (serving needs the same pixels).

- ``SketchExtractor``: a deterministic edge/line sketch when the layout ships none; a learned extractor
  (TorchScript, ``(1,3,H,W) in [0,1] -> (1,1,H,W)`` lines dark on white) may be loaded from a local path.
- ``clean_caption``: strips terminal escape sequences and control characters, instruction remnants and
  unfilled ``[placeholders]``, normalises spacing and punctuation; the 77-token cap is applied where the
  run's tokenizer lives (the encoder actor).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


class SketchExtractor:
    """Image -> line sketch (uint8 HxW, dark lines on white).

    The built-in method is a difference-of-Gaussians line drawing on the luminance: it is deterministic,
    keeps facial contours (eyes, brows, lips, hairline, jaw) and ignores flat shading, close to the
    edge/saliency sketches the papers train on. ``path`` loads a learned extractor instead.
    """

    def __init__(self, path: str | Path | None = None, sigma: float = 1.0, threshold: float = 4.0) -> None:
        self.path = str(path) if path else None
        self.sigma = sigma
        self.threshold = threshold
        self._model = None

    @property
    def name(self) -> str:
        return f"learned:{Path(self.path).name}" if self.path else "dog"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.path:
            return self._learned(image)
        grey = Image.fromarray(image).convert("L")
        scale = max(image.shape[0] / 256.0, 1.0)  # line width grows with resolution, never below ~1 px
        fine = np.asarray(grey.filter(ImageFilter.GaussianBlur(self.sigma * scale)), dtype=np.float32)
        coarse = np.asarray(grey.filter(ImageFilter.GaussianBlur(1.6 * self.sigma * scale)), dtype=np.float32)
        dog = coarse - fine  # positive on the dark side of an edge: a single line per contour
        lines = np.clip((dog - self.threshold) * 24.0, 0, 255)
        return (255 - lines).astype(np.uint8)

    def _learned(self, image: np.ndarray) -> np.ndarray:
        import torch

        if self._model is None:
            self._model = torch.jit.load(self.path, map_location="cpu").eval()
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            y = self._model(x)
        return (y[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


_INSTRUCTION_PREFIX = re.compile(
    r"^\s*(?:sure[,!.]?\s*)?(?:here(?:'s| is)\s+(?:a|an|the)\s+[^:]{0,60}:|"
    r"(?:caption|description|prompt|answer|output)\s*:)\s*",
    re.IGNORECASE,
)
# ANSI/VT escapes as terminals and logging tools leave them in scraped text: CSI (colours, cursor moves),
# OSC (window titles, up to BEL or ST), and the short ESC + intermediates + final forms (charset switches).
_TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]*[0-~])")
# C0/C1 controls other than whitespace, and invisible format characters (zero-width spaces, BOM, bidi marks).
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_PLACEHOLDER = re.compile(r"\[[^\]]*\]|<[^>]*>|\{[^}]*\}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCT = re.compile(r"([,.;:!?])(?:\s*[,.;:!?])+")


def clean_caption(text: str) -> str:
    """One caption, tidied; empty string when nothing usable is left."""
    text = _CONTROL.sub("", _TERMINAL_ESCAPE.sub("", text))
    text = text.replace("\u00a0", " ").strip().strip("\"'")
    previous = None
    while previous != text:  # remnants can stack: "Sure! Here is a caption: Caption: ..."
        previous = text
        text = _INSTRUCTION_PREFIX.sub("", text)
    text = _PLACEHOLDER.sub("", text)
    text = re.sub(r"\s+", " ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = text.strip(" ,;:")
    if not re.search(r"[A-Za-z]", text):
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return text


def clean_captions(captions: list[str]) -> list[str]:
    """Cleans each caption and drops empties and exact duplicates, keeping the first occurrence's order."""
    seen: dict[str, None] = {}
    for caption in captions:
        cleaned = clean_caption(caption)
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)
