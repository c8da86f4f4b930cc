"""Transforms: mask decoupling, sketch extraction, caption cleaning."""

import numpy as np
import pytest

from modeling.conditions import CELEBAMASK_COLORS, decouple_mask
from pipelines.data.transforms import SketchExtractor, clean_caption, clean_captions


def test_decoupled_masks_partition_the_image_and_match_the_colour_map():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 19, size=(32, 32)).astype(np.uint8)
    colour, binary = decouple_mask(labels)
    assert binary.shape == (19, 32, 32) and colour.shape == (32, 32, 3)
    assert (binary.sum(0) == 1).all()  # every pixel in exactly one class, background included
    assert np.array_equal(binary.argmax(0), labels)
    assert np.array_equal(colour, CELEBAMASK_COLORS[labels])


def test_sketch_is_deterministic_and_draws_lines_at_edges():
    image = np.full((64, 64, 3), 200, np.uint8)
    image[16:48, 16:48] = 40  # a dark square on a light background
    sketch = SketchExtractor()(image)
    assert sketch.dtype == np.uint8 and sketch.shape == (64, 64)
    assert np.array_equal(sketch, SketchExtractor()(image))
    assert sketch[2:10, 2:10].min() == 255 and sketch[28:36, 28:36].min() == 255  # flat areas stay white
    assert sketch[14:18, 20:44].min() < 128  # a line along the square's top edge


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Sure! Here is a caption: the woman has  blond hair", "The woman has blond hair."),
        ("Caption: She wears [accessory] earrings , and smiles ..", "She wears earrings, and smiles."),
        ("a man with glasses!", "A man with glasses!"),
        ("[name]", ""),
        ("   ", ""),
        ("\x1b[31mA red\x1b[0m face\x07 with\x00 freckles", "A red face with freckles."),
        ("\x1b]0;title\x07smiling \x1b(Bwoman\x9b", "Smiling woman."),
        ("\ufeffa face\u200b", "A face."),
        ("\x1b[31m\x07\x00", ""),
        ("\x1b[1;32m[name]\x1b[m", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_captions_drops_empties_and_duplicates():
    assert clean_captions(["a face", "", "A face.", "[x]", "two faces"]) == ["A face.", "Two faces."]
    # a caption that is only terminal escapes and control characters is no caption at all
    assert clean_captions(["\x1b[31m\x07\x00", "\x1b[0m"]) == []
