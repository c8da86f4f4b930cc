"""The synthetic yardstick: its scoring on known images, its parser as a judge, and a shortened demo recipe that
trains MMFace-DiT through the real trainer and must score clearly above chance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from modeling.conditions import NUM_CLASSES
from pipelines.data.synth import render_face, sample_attributes
from pipelines.eval.yardstick import flat_metrics, score


def _renders(n: int, size: int = 32, seed: int = 11):
    images, labels, attributes = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        attrs = sample_attributes(rng)
        image, label = render_face(attrs, rng, size)
        images.append(image)
        labels.append(label)
        attributes.append(dataclasses.asdict(attrs))
    return np.stack(images), np.stack(labels), attributes


def test_real_renders_score_perfectly_and_noise_scores_near_chance():
    images, labels, attributes = _renders(24)
    perfect = score(images, labels, labels, attributes)
    assert perfect["miou"] == 1.0 and perfect["mask_acc"] == 1.0
    # faces whose masks are not their own: the shuffled baseline is what ignoring the mask earns
    assert perfect["miou_shuffled"] < 0.7 and perfect["miou_chance"] == round(1 / NUM_CLASSES, 4)
    for name in ("hair_color", "background_color"):
        entry = perfect["attributes"][name]
        assert entry["n"] > 0 and entry["accuracy"] >= 0.95, (name, entry)  # the reader reads renders right
        assert entry["shuffled"] < entry["accuracy"]

    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    parsed = np.random.default_rng(1).integers(0, NUM_CLASSES, labels.shape)
    random = score(noise, labels, parsed, attributes)
    assert random["miou"] < 0.1
    hair = random["attributes"]["hair_color"]
    assert hair["accuracy"] < 0.5  # grey medians land on one palette entry, not the stated one

    metrics = flat_metrics(perfect)
    assert metrics["eval/miou"] == 1.0 and "eval/hair_color_acc" in metrics and "eval/hair_color_chance" in metrics


def test_a_parser_under_the_bar_is_refused_as_a_judge(tmp_path):
    from modeling.judges.synthetic_parser import load_parser
    from pipelines.eval.parser import train_parser

    info = train_parser(tmp_path / "weak", steps=3, n_train=64, n_test=32)
    assert not info["counts_as_judge"] and info["pixel_accuracy"] < 0.95
    with pytest.raises(ValueError, match="0.95"):
        load_parser(tmp_path / "weak")
    with pytest.raises(FileNotFoundError):
        load_parser(tmp_path / "missing")
