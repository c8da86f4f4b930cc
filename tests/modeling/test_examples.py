"""Example conditions: the default layout is the most typical mask, and a saved set reads back exactly."""

from __future__ import annotations

import numpy as np

from modeling.examples import Example, ExampleSet, load_examples, most_typical, save_examples


def test_the_default_layout_is_the_mask_that_agrees_most_with_the_others():
    face = np.zeros((16, 16), np.uint8)
    face[4:12, 4:12], face[2:4, 4:12], face[12:, :] = 1, 13, 18  # skin, hair, cloth
    shifted = [np.roll(face, k, axis=1) for k in (-3, -1, 0, 1, 3)]  # the unshifted face sits in the middle
    odd = np.full((16, 16), 14, np.uint8)
    assert most_typical(np.stack([odd, *shifted])) == 3


def test_examples_round_trip_through_their_folder(tmp_path):
    rng = np.random.default_rng(0)
    examples = [
        Example("27001", "a person with red hair", rng.integers(0, 19, (8, 8), np.uint8), None),
        Example("27002", "", rng.integers(0, 19, (8, 8), np.uint8), rng.integers(0, 256, (8, 8), np.uint8)),
    ]
    save_examples(tmp_path / "examples", ExampleSet(examples, default_layout=1, source={"split": "test"}))
    back = load_examples(tmp_path / "examples")
    assert back.default_layout == 1 and back.source == {"split": "test"}
    assert np.array_equal(back.layout, examples[1].mask)
    for a, b in zip(examples, back.examples):
        assert (a.id, a.caption) == (b.id, b.caption) and np.array_equal(a.mask, b.mask)
        assert (a.sketch is None) == (b.sketch is None) and (a.sketch is None or np.array_equal(a.sketch, b.sketch))
