"""Fixtures that write small datasets as real files in each supported layout, good and broken records alike.

Each builder returns the root plus what it drew (part arrays, label maps, captions), so tests compare
what a reader returns against an independent reference rather than against the reader's own logic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling.conditions import labels_to_color
from pipelines.data.layouts import CELEBAMASK_PARTS


@dataclass
class BuiltDataset:
    root: Path
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # expected label map per good id
    parts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # celebamask-hq: drawn parts
    captions: dict[str, list[str]] = field(default_factory=dict)
    sketches: dict[str, np.ndarray] = field(default_factory=dict)  # expected (dark lines on white)
    bad: dict[str, str] = field(default_factory=dict)  # id -> a word the RecordError reason must contain


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def random_blobs(rng: np.random.Generator, h: int, w: int, n: int) -> dict[str, np.ndarray]:
    """``n`` overlapping rectangles, each a different part, so merge order matters."""
    chosen = rng.choice(len(CELEBAMASK_PARTS), size=n, replace=False)
    parts = {}
    for k in sorted(chosen):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = y0 + rng.integers(3, h // 2 + 4), x0 + rng.integers(3, w // 2 + 4)
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = True
        parts[CELEBAMASK_PARTS[k]] = mask
    return parts


def random_labels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    labels = np.zeros((h, w), dtype=np.uint8)
    for label in rng.choice(np.arange(1, 19), size=8, replace=False):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        labels[y0 : y0 + rng.integers(2, h // 2), x0 : x0 + rng.integers(2, w // 2)] = label
    return labels


def save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def save_truncated_jpeg(path: Path, image: np.ndarray) -> None:
    save_jpeg(path, image)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)


def _part_path(root: Path, n: int, part: str) -> Path:
    return root / "CelebAMask-HQ-mask-anno" / str(n // 2000) / f"{n:05d}_{part}.png"


@pytest.fixture
def celebamask_dataset(tmp_path: Path) -> BuiltDataset:
    """Images 64x64 with 32x32 part masks (like the real 1024/512), L and RGB parts, ids in folders 0, 1, 13."""
    rng = np.random.default_rng(1)
    built = BuiltDataset(root=tmp_path / "celebamask")
    root = built.root
    good = {"0": "L", "1": "RGB", "2001": "L", "3999": "RGB", "27001": "L"}
    for record_id, mode in good.items():
        n = int(record_id)
        save_jpeg(root / "CelebA-HQ-img" / f"{n}.jpg", random_image(rng, 64, 64))
        parts = random_blobs(rng, 32, 32, n=6)
        for part, mask in parts.items():
            # Official masks are 0/255; any nonzero value must count, so one id uses 1 instead.
            on_value = 1 if record_id == "2001" else 255
            grey = mask.astype(np.uint8) * on_value
            array = grey if mode == "L" else np.repeat(grey[..., None], 3, axis=2)
            save_png(_part_path(root, n, part), array)
        built.parts[record_id] = parts
    for record_id, lines in {"0": ["a face.", "", "  another face  "], "2001": ["only one"]}.items():
        path = root / "celeba-caption" / f"{record_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        built.captions[record_id] = [line.strip() for line in lines if line.strip()]

    def image(n: int) -> None:
        save_jpeg(root / "CelebA-HQ-img" / f"{n}.jpg", random_image(rng, 64, 64))

    # 5: truncated jpeg
    save_truncated_jpeg(root / "CelebA-HQ-img" / "5.jpg", random_image(rng, 64, 64))
    save_png(_part_path(root, 5, "skin"), np.full((32, 32), 255, np.uint8))
    built.bad["5"] = "unreadable"
    # 6: no mask parts at all
    image(6)
    built.bad["6"] = "no mask parts"
    # 7: a part file that is not a PNG
    image(7)
    save_png(_part_path(root, 7, "skin"), np.full((32, 32), 255, np.uint8))
    _part_path(root, 7, "hair").write_bytes(b"not a png at all")
    built.bad["7"] = "00007_hair.png is unreadable"
    # 8: masks 32x16 for a square image: aspect ratios differ
    image(8)
    save_png(_part_path(root, 8, "skin"), np.full((16, 32), 255, np.uint8))
    built.bad["8"] = "aspect"
    # 9: parts of two different sizes
    image(9)
    save_png(_part_path(root, 9, "skin"), np.full((32, 32), 255, np.uint8))
    save_png(_part_path(root, 9, "nose"), np.full((16, 16), 255, np.uint8))
    built.bad["9"] = "00009_nose.png is 16x16"
    # 26001: a zero-byte image file
    path = root / "CelebA-HQ-img" / "26001.jpg"
    path.write_bytes(b"")
    save_png(_part_path(root, 26001, "skin"), np.full((32, 32), 255, np.uint8))
    built.bad["26001"] = "unreadable"
    return built


@pytest.fixture
def mmcelebahq_dataset(tmp_path: Path) -> BuiltDataset:
    rng = np.random.default_rng(2)
    built = BuiltDataset(root=tmp_path / "mmcelebahq")
    root = built.root
    text = {}
    for record_id, kind in {"0": "L", "12": "P", "27000": "L"}.items():
        save_jpeg(root / "face" / f"{record_id}.jpg", random_image(rng, 48, 48))
        labels = random_labels(rng, 48, 48)
        if kind == "P":
            img = Image.fromarray(labels, mode="L").convert("P")
            # A palette whose entry k is the colour of class k, as released palette masks do.
            img.putpalette(labels_to_color(np.arange(19, dtype=np.uint8)[None]).reshape(-1).tolist())
            img.putdata(labels.reshape(-1).tolist())
            (root / "mask").mkdir(parents=True, exist_ok=True)
            img.save(root / "mask" / f"{record_id}.png")
            assert Image.open(root / "mask" / f"{record_id}.png").mode == "P"
        else:
            save_png(root / "mask" / f"{record_id}.png", labels)
        built.labels[record_id] = labels
        built.captions[record_id] = [f"caption {i} of {record_id}" for i in range(3)]
        text[f"{record_id}.jpg"] = built.captions[record_id]
    save_jpeg(root / "face" / "3.jpg", random_image(rng, 48, 48))
    save_png(root / "mask" / "3.png", np.full((48, 48), 25, np.uint8))
    built.bad["3"] = "label values out of range"
    save_jpeg(root / "face" / "4.jpg", random_image(rng, 48, 48))
    built.bad["4"] = "mask/4.png"
    (root / "text.json").write_text(json.dumps(text), encoding="utf-8")
    return built


@pytest.fixture
def mmface_dataset(tmp_path: Path) -> BuiltDataset:
    rng = np.random.default_rng(3)
    built = BuiltDataset(root=tmp_path / "mmface")
    root = built.root
    for record_id in ("7", "30", "27500", "ffhq_a"):
        save_jpeg(root / "images" / f"{record_id}.jpg", random_image(rng, 40, 40))
        labels = random_labels(rng, 40, 40)
        # Colour masks that went through resampling carry small errors; nearest colour undoes them.
        noisy = labels_to_color(labels).astype(np.int16) + rng.integers(-14, 15, size=(40, 40, 3))
        save_png(root / "masks" / f"{record_id}.png", np.clip(noisy, 0, 255).astype(np.uint8))
        built.labels[record_id] = labels
        lines = np.full((40, 40), 255, np.uint8)
        lines[rng.integers(0, 40, 30), rng.integers(0, 40, 30)] = 0
        # One sketch is stored the other way round (light lines on black), as edge detectors emit.
        stored = 255 - lines if record_id == "30" else lines
        save_png(root / "sketches" / f"{record_id}.png", stored)
        built.sketches[record_id] = lines
        built.captions[record_id] = [f"person {record_id}", "second line"]
        (root / "captions").mkdir(exist_ok=True)
        (root / "captions" / f"{record_id}.txt").write_text("\n".join(built.captions[record_id]), encoding="utf-8")
    # No mask and no sketch: allowed, the record simply has neither.
    save_jpeg(root / "images" / "8.jpg", random_image(rng, 40, 40))
    built.captions["8"] = []
    save_png(root / "images" / "9.png", random_image(rng, 40, 40))
    save_png(root / "masks" / "9.png", labels_to_color(random_labels(rng, 20, 40)))
    built.bad["9"] = "aspect"
    return built


@pytest.fixture
def folder_dataset(tmp_path: Path) -> BuiltDataset:
    rng = np.random.default_rng(4)
    built = BuiltDataset(root=tmp_path / "folder")
    root = built.root
    root.mkdir()
    save_jpeg(root / "alice.jpg", random_image(rng, 32, 48))
    save_png(root / "bob.png", random_image(rng, 32, 32))
    Image.fromarray(random_image(rng, 32, 32)).save(root / "carol.webp")
    save_jpeg(root / "dave.jpeg", random_image(rng, 32, 32))
    built.labels["alice"] = random_labels(rng, 16, 24)  # half size, same aspect
    save_png(root / "masks" / "alice.png", built.labels["alice"])
    built.labels["bob"] = random_labels(rng, 32, 32)
    save_png(root / "masks" / "bob.png", labels_to_color(built.labels["bob"]))
    built.sketches["carol"] = np.where(rng.random((32, 32)) < 0.1, 0, 255).astype(np.uint8)
    save_png(root / "sketches" / "carol.png", built.sketches["carol"])
    rows = [
        {"id": "alice", "captions": ["Alice smiles.", "A woman."], "split": "test"},
        {"file": "bob.png", "caption": "Bob."},
        {"id": "carol", "captions": []},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    built.captions = {"alice": ["Alice smiles.", "A woman."], "bob": ["Bob."], "carol": [], "dave": []}
    # Two images with one stem: which one is meant is unknowable.
    save_jpeg(root / "erin.jpg", random_image(rng, 32, 32))
    save_png(root / "erin.png", random_image(rng, 32, 32))
    built.bad["erin"] = "ambiguous"
    return built


NO_CAPTION = "no usable caption"  # rejected by prepare after caption cleaning, not by the reader


def damage_celebamask(root: Path) -> dict[str, str | None]:
    """Breaks a synthetic CelebAMask-HQ copy (ids 8..40 must exist) in every way a dataset on disk breaks.

    Returns what each touched id must become: ``None`` = written, else a fragment its reject reason must
    contain (the damaged file's name, or what was wrong). Untouched ids must simply be written.
    """
    images, masks, captions = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask-anno" / "0", root / "celeba-caption"
    expected: dict[str, str | None] = {}

    def part(n: int, name: str = "skin") -> Path:
        return masks / f"{n:05d}_{name}.png"

    def replace_with_dir(path: Path) -> None:
        path.unlink()
        path.mkdir()

    def replace_with_link(path: Path, target: str) -> None:
        path.unlink()
        path.symlink_to(target)

    # images
    (images / "8.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    expected["8"] = "CelebA-HQ-img/8.jpg is unreadable"
    (images / "9.jpg").write_bytes(b"")
    expected["9"] = "CelebA-HQ-img/9.jpg is unreadable"
    replace_with_dir(images / "10.jpg")
    expected["10"] = "CelebA-HQ-img/10.jpg is a folder"
    replace_with_link(images / "11.jpg", "gone.jpg")
    expected["11"] = "CelebA-HQ-img/11.jpg is a broken symlink"
    replace_with_link(images / "12.jpg", "12.jpg")
    expected["12"] = "CelebA-HQ-img/12.jpg is a symlink loop"
    (images / "13.jpg").rename(images / "13.bmp")
    expected["13"] = "CelebA-HQ-img/13.bmp"
    (images / "14.jpg").rename(images / "14.JPG")  # an upper-case extension is still a JPEG
    expected["14"] = None
    Image.open(images / "15.jpg").save(images / "15.png")
    expected["15"] = "ambiguous"
    (images / "016.jpg").write_bytes((images / "16.jpg").read_bytes())  # the same face again, under a padded id
    expected["016"] = "CelebA-HQ-img/016.jpg"
    expected["16"] = None
    Image.open(images / "17.jpg").save(images / "17.jpg", format="PNG")  # PNG bytes behind a .jpg name
    expected["17"] = None
    (images / "80.txt").write_text("not an image")
    expected["80"] = "CelebA-HQ-img/80.txt"
    (images / "cover.jpg").write_bytes((images / "18.jpg").read_bytes())
    expected["cover"] = "CelebA-HQ-img/cover.jpg"
    # mask parts
    part(19).write_bytes(b"")
    expected["19"] = "00019_skin.png is unreadable"
    data = part(20).read_bytes()
    part(20).write_bytes(data[: len(data) // 2])
    expected["20"] = "00020_skin.png is unreadable"
    replace_with_dir(part(21))
    expected["21"] = "00021_skin.png is a folder"
    replace_with_link(part(22), "missing_skin.png")
    expected["22"] = "00022_skin.png is a broken symlink"
    replace_with_link(part(23), part(23).name)
    expected["23"] = "00023_skin.png is a symlink loop"
    Image.open(part(24, "nose")).resize((32, 32)).save(part(24, "nose"))
    expected["24"] = "00024_nose.png is 32x32"
    Image.open(part(25)).resize((64, 32)).save(part(25))
    expected["25"] = "aspect"
    # captions
    (captions / "26.txt").write_text("")
    expected["26"] = NO_CAPTION
    (captions / "27.txt").write_bytes(b"\xff\xfe\x00\xd8 not utf-8")
    expected["27"] = "celeba-caption/27.txt unreadable"
    replace_with_dir(captions / "28.txt")
    expected["28"] = "celeba-caption/28.txt is a folder"
    replace_with_link(captions / "29.txt", "nowhere.txt")
    expected["29"] = "celeba-caption/29.txt is a broken symlink"
    (captions / "30.txt").write_text("\x1b[31m\x07\x00\n\x1b[0m\n   \n")
    expected["30"] = NO_CAPTION
    (captions / "31.txt").unlink()
    expected["31"] = NO_CAPTION
    (captions / "32.txt").write_text("\x1b[1;31mA face\x1b[0m with\x00 red hair\x07\n")
    expected["32"] = None
    return expected
