"""Synthetic faces: written in the CelebAMask-HQ layout, deterministic, attributes visible, captions truthful."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from modeling.conditions import CLASS_NAMES
from pipelines.data.layouts import CELEBAMASK_PARTS
from pipelines.data.readers import FaceRecord, check_dataset, open_reader
from pipelines.data.synth import (
    HAIR_COLOURS,
    NAMED_COLOURS,
    SKIN_TONES,
    FaceAttributes,
    attributes_of,
    render_face,
    sample_attributes,
    synthesize,
)

N, SIZE, SEED = 48, 128, 3
LABEL = {name: i for i, name in enumerate(CLASS_NAMES)}
ACCESSORY_WORDS = {"eyeglasses": r"(?:eye)?glasses", "hat": "hat", "earrings": "earrings", "necklace": "necklace"}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "faces"
    summary = synthesize(out, N, size=SIZE, seed=SEED, test_fraction=0.25)
    assert summary["test_from"] == 36 and (summary["n_train"], summary["n_test"]) == (36, 12)
    return out


@pytest.fixture(scope="module")
def records(synth_dir: Path) -> dict[str, FaceRecord]:
    reader = open_reader("celebamask-hq", synth_dir)
    return {record.id: record for record in reader}


@pytest.fixture(scope="module")
def attributes(synth_dir: Path) -> dict[str, dict]:
    return attributes_of(synth_dir)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are in the mask too: away from edges that JPEG blends."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def nearest_name(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name]))))


def test_layout_on_disk(synth_dir: Path, attributes: dict[str, dict]) -> None:
    assert sorted((synth_dir / "CelebA-HQ-img").iterdir()) == sorted(
        synth_dir / "CelebA-HQ-img" / f"{i}.jpg" for i in range(N)
    )
    for part_file in (synth_dir / "CelebAMask-HQ-mask-anno" / "0").iterdir():
        assert re.fullmatch(r"\d{5}_(\w+)\.png", part_file.name).group(1) in CELEBAMASK_PARTS
    for i in range(N):
        lines = (synth_dir / "celeba-caption" / f"{i}.txt").read_text(encoding="utf-8").splitlines()
        assert lines == attributes[str(i)]["captions"] and len(lines) == 10 and len(set(lines)) == 10
    assert set(attributes) == {str(i) for i in range(N)}


def test_reader_round_trip_matches_the_drawing(synth_dir: Path, records: dict[str, FaceRecord], attributes) -> None:
    report = check_dataset(open_reader("celebamask-hq", synth_dir))
    assert (report["n_ok"], report["n_bad"], report["splits"]) == (N, 0, {"train": 36, "test": 12})
    assert report["with_captions"] == N
    for i in (0, 17, 47):
        # Re-draw face i from its own seed, independently of the files.
        rng = np.random.default_rng([SEED, i])
        attrs = sample_attributes(rng)
        image, labels = render_face(attrs, rng, SIZE)
        record = records[str(i)]
        assert {k: v for k, v in attributes[str(i)].items() if k not in ("id", "captions")} == vars(attrs)
        assert np.array_equal(record.label_map, labels)
        assert record.image.shape == (SIZE, SIZE, 3)
        assert np.abs(record.image.astype(int) - image.astype(int)).mean() < 3.0  # only JPEG loss
        assert record.split == ("train" if i < 36 else "test")


def test_deterministic_and_independent_of_workers(synth_dir: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "again", N, size=SIZE, seed=SEED, test_fraction=0.25, workers=2)
    assert all_files(tmp_path / "again") == all_files(synth_dir)
    synthesize(tmp_path / "other", 4, size=SIZE, seed=SEED + 1)
    first = lambda root: (root / "celeba-caption" / "0.txt").read_bytes()  # noqa: E731
    assert first(tmp_path / "other") != first(synth_dir)


def test_every_attribute_occurs_both_ways(attributes: dict[str, dict]) -> None:
    rows = attributes.values()
    for key in ("eyeglasses", "hat", "earrings", "necklace", "smiling"):
        assert {row[key] for row in rows} == {True, False}, key
    assert {row["hair_length"] for row in rows} == {"short", "long", "bald"}
    assert len({row["hair_color"] for row in rows}) >= 4 and len({row["skin_tone"] for row in rows}) >= 4


def test_attributes_are_visible_in_masks(records: dict[str, FaceRecord], attributes: dict[str, dict]) -> None:
    for record_id, attrs in attributes.items():
        present = set(np.unique(records[record_id].label_map).tolist())
        assert (LABEL["eye_g"] in present) == attrs["eyeglasses"], record_id
        assert (LABEL["hat"] in present) == attrs["hat"], record_id
        assert (LABEL["ear_r"] in present) == attrs["earrings"], record_id
        assert (LABEL["neck_l"] in present) == attrs["necklace"], record_id
        assert (LABEL["mouth"] in present) == attrs["smiling"], record_id  # open mouth only when smiling
        assert (LABEL["hair"] in present) == (attrs["hair_length"] != "bald"), record_id
        always = ("background", "skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear")
        assert {LABEL[n] for n in (*always, "u_lip", "l_lip", "neck", "cloth")} <= present, record_id


def test_attributes_are_visible_in_pixels(records: dict[str, FaceRecord], attributes: dict[str, dict]) -> None:
    def median_colour(record: FaceRecord, part: str) -> np.ndarray:
        pixels = record.image[interior(record.label_map == LABEL[part])]
        assert len(pixels) >= 4, (record.id, part)
        return np.median(pixels, axis=0)

    for record_id, attrs in attributes.items():
        record = records[record_id]

        assert nearest_name(median_colour(record, "skin"), SKIN_TONES) == attrs["skin_tone"], record_id
        assert nearest_name(median_colour(record, "background"), NAMED_COLOURS) == attrs["background_color"], record_id
        assert nearest_name(median_colour(record, "cloth"), NAMED_COLOURS) == attrs["cloth_color"], record_id
        if attrs["hat"]:
            assert nearest_name(median_colour(record, "hat"), NAMED_COLOURS) == attrs["hat_color"], record_id
        if attrs["hair_color"]:
            assert nearest_name(median_colour(record, "hair"), HAIR_COLOURS) == attrs["hair_color"], record_id
        if attrs["smiling"]:
            # The open mouth is dark inside, with light teeth at the top.
            mouth = record.image[record.label_map == LABEL["mouth"]].astype(int)
            assert mouth.sum(axis=1).min() < 300 and mouth.sum(axis=1).max() > 550, record_id


def _without_negations(caption: str) -> str:
    return re.sub(r"\bno (?:(?:eye)?glasses|hat|earrings|necklace)\b", "", caption)


def test_captions_state_only_true_attributes(attributes: dict[str, dict]) -> None:
    for record_id, attrs in attributes.items():
        for caption in attrs["captions"]:
            where = (record_id, caption)
            text = caption.lower()
            if attrs["hair_length"] == "bald":
                assert "bald" in text and " hair " not in text.replace("hair at all", ""), where
            else:
                assert f"{attrs['hair_color']} hair" in text and attrs["hair_length"] in text, where
            positive = _without_negations(text)
            for key, word in ACCESSORY_WORDS.items():
                assert not (re.search(rf"\b{word}\b", positive) and not attrs[key]), where
                assert not (re.search(rf"\bno {word}\b", text) and attrs[key]), where
            if attrs["hat"] and re.search(r"\bhat\b", positive):
                assert f"{attrs['hat_color']} hat" in text, where
            assert ("smil" in text) <= attrs["smiling"], where
            assert not (attrs["smiling"] and re.search(r"neutral|serious|calm", text)), where
            if "background" in text:
                assert f"{attrs['background_color']} background" in text, where
            for garment in re.findall(r"(\w+) (?:shirt|clothes|top)\b", text):
                assert garment == attrs["cloth_color"], where
            for tone in re.findall(r"(\w+)(?:-toned)? (?:skin|complexion)\b", text):
                assert tone == attrs["skin_tone"], where


def test_captions_vary(attributes: dict[str, dict]) -> None:
    captions = [c for attrs in attributes.values() for c in attrs["captions"]]
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len(openings) >= 10
    assert any("smil" in c for c in captions) and any(re.search(r"\bno \w+", c) for c in captions)


def test_existing_output_is_reused_or_protected(synth_dir: Path, tmp_path: Path) -> None:
    before = all_files(synth_dir)
    assert synthesize(synth_dir, N, size=SIZE, seed=SEED, test_fraction=0.25)["reused"] is True
    assert all_files(synth_dir) == before
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(synth_dir, N, size=SIZE, seed=SEED + 1, test_fraction=0.25)
    out = tmp_path / "faces"
    synthesize(out, 3, size=64, seed=0)
    stale = out / "CelebAMask-HQ-mask-anno" / "0" / "00002_hat.png"
    stale.write_bytes(b"left over")
    synthesize(out, 3, size=64, seed=5, overwrite=True)
    attrs = attributes_of(out)["2"]
    assert stale.exists() == attrs["hat"]
    assert check_dataset(open_reader("celebamask-hq", out))["n_ok"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 2, "size": 16}, "size must be"),
        ({"n": 2, "test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "x", **kwargs)


def test_small_sizes_keep_every_part(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    attrs = FaceAttributes(
        skin_tone="fair",
        hair_color="black",
        hair_length="long",
        eyeglasses=True,
        hat=True,
        hat_color="red",
        earrings=True,
        necklace=True,
        smiling=True,
        cloth_color="blue",
        background_color="white",
    )
    for size in (32, 64, 256):
        _, labels = render_face(attrs, rng, size)
        assert set(np.unique(labels).tolist()) == set(range(19)), size
