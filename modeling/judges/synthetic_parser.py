"""The synthetic face parser: the judge of mask adherence on the embedded synthetic faces.

A small U-Net (three poolings, GroupNorm + SiLU blocks, skip connections) that labels every pixel of a
synthetic face render with one of the 19 CelebAMask-HQ classes. faceforge trains it on fresh renders of the
synthetic face generator (``faceforge eval train-parser``) and keeps its held-out pixel accuracy in its
config: a parser below 0.95 is refused as a judge. It knows synthetic faces only; real photos need the
BiSeNet judge (``modeling.judges.bisenet``).

Folder layout: ``config.json`` (size, width, accuracy) + ``model.safetensors``. Input: (N, 3, S, S) uint8 or
float in [0, 1]; output: (N, S, S) int64 labels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.conditions import NUM_CLASSES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MIN_ACCURACY = 0.95  # below this held-out pixel accuracy a parser does not count as a judge


@dataclass
class ParserConfig:
    size: int = 32
    width: int = 24
    pixel_accuracy: float | None = None  # on held-out renders, written by the trainer
    miou: float | None = None


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
    )


class SyntheticParser(nn.Module):
    def __init__(self, config: ParserConfig) -> None:
        super().__init__()
        if config.size % 8:
            raise ValueError(f"parser size {config.size} must be a multiple of 8 (three poolings)")
        self.config = config
        c = config.width
        self.enc1, self.enc2, self.enc3 = _block(3, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        self.mid = _block(4 * c, 4 * c)
        self.dec3, self.dec2, self.dec1 = _block(8 * c, 2 * c), _block(4 * c, c), _block(2 * c, c)
        self.head = nn.Conv2d(c, NUM_CLASSES, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, 19, S, S) class logits."""
        e1 = self.enc1(x)
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        e3 = self.enc3(F.avg_pool2d(e2, 2))
        m = self.mid(F.avg_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([F.interpolate(m, scale_factor=2.0), e3], dim=1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], dim=1))
        return self.head(d1)

    @torch.no_grad()
    def parse(self, images: Tensor, batch: int = 128) -> Tensor:
        """Labels (N, S, S) of images (N, 3, H, W), uint8 or [0, 1] floats, resized to the parser's size."""
        was_training = self.training
        self.eval()
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.config.size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x * 2 - 1
        device = next(self.parameters()).device
        out = torch.cat([self(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])
        self.train(was_training)
        return out


def save_parser(parser: SyntheticParser, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in parser.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(parser.config), indent=2) + "\n")
    return directory


def load_parser(directory: str | Path, device: str | torch.device = "cpu", require_accuracy: bool = True):
    """A trained parser from its folder; refuses one whose held-out accuracy is under ``MIN_ACCURACY``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{directory}: no synthetic parser here ({CONFIG_FILE} + {WEIGHTS_FILE}); "
            "train one with `faceforge eval train-parser --out DIR`"
        )
    config = ParserConfig(**json.loads(config_path.read_text()))
    if require_accuracy and (config.pixel_accuracy is None or config.pixel_accuracy < MIN_ACCURACY):
        raise ValueError(
            f"{directory}: parser pixel accuracy {config.pixel_accuracy} on held-out renders is under "
            f"{MIN_ACCURACY}; it does not count as a judge (train longer: faceforge eval train-parser --steps)"
        )
    parser = SyntheticParser(config)
    parser.load_state_dict(load_file(str(weights)), strict=True)
    return parser.to(device).eval()
