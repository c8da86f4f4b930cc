"""``faceforge eval train-parser``: train the synthetic face parser, the mask-adherence judge of the yardstick.

Training data are fresh renders of the synthetic face generator (``pipelines.data.synth``) at the eval
resolution, drawn from seeds the demo's datasets never use; a separate held-out set of renders measures the
parser's own pixel accuracy and mIoU, written into its config. Below 0.95 pixel accuracy the parser is
refused as a judge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling.judges.synthetic_parser import MIN_ACCURACY, ParserConfig, SyntheticParser, save_parser
from pipelines.data.synth import render_face, sample_attributes
from pipelines.eval.yardstick import confusion, mean_iou

# render seeds of the parser's own data: disjoint from every synthesize(seed=...) a user would pick
TRAIN_SEED, TEST_SEED = 90_001, 90_002


def renders(seed: int, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, S, S) in [-1, 1], labels (n, S, S)) of ``n`` synthetic faces."""
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        images[i], labels[i] = render_face(sample_attributes(rng), rng, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.from_numpy(labels).long()


def train_parser(
    out: str | Path,
    size: int = 32,
    n_train: int = 4000,
    n_test: int = 500,
    steps: int = 500,
    batch: int = 64,
    lr: float = 3e-3,
    width: int = 24,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Trains, measures on held-out renders, saves ``out`` (config.json + model.safetensors); returns the config."""
    torch.manual_seed(seed)
    x_train, y_train = renders(TRAIN_SEED, n_train, size)
    x_test, y_test = renders(TEST_SEED, n_test, size)
    parser = SyntheticParser(ParserConfig(size=size, width=width))
    optimizer = torch.optim.AdamW(parser.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    parser.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, n_train, (batch,), generator=generator)
        loss = F.cross_entropy(parser(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, steps)
    predicted = parser.parse((x_test + 1) / 2)
    matrix = confusion(y_test.numpy(), predicted.numpy())
    parser.config.pixel_accuracy = round(float(np.trace(matrix) / matrix.sum()), 4)
    parser.config.miou = round(mean_iou(matrix), 4)
    save_parser(parser, out)
    summary = {**parser.config.__dict__, "seconds": round(time.perf_counter() - started, 1), "out": str(out)}
    summary["counts_as_judge"] = parser.config.pixel_accuracy >= MIN_ACCURACY
    return summary
