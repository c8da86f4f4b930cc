"""Readers for the face dataset layouts faceforge accepts; each yields ``FaceRecord``s or ``RecordError``s.

Layouts (``root`` is the folder passed as ``--root``):

``celebamask-hq``
    ``CelebA-HQ-img/{id}.jpg``; ``CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png`` binary part
    masks (L or RGB, nonzero = part), merged in label order 1..18 with later parts overwriting earlier
    ones; ``celeba-caption/{id}.txt`` (MM-CelebA-HQ, one caption per line). A ``synth.json`` written
    by the synthetic generator supplies ``test_from`` when the caller gives none.
``mmcelebahq`` (Face-MoGLE)
    ``face/{id}.jpg``, ``mask/{id}.png`` (label values, or a palette PNG whose indices are labels),
    ``text.json`` mapping ``"{id}.jpg"`` to a list of captions.
``mmface`` (MMFace-DiT)
    ``images/``, optional ``masks/`` (colour-coded RGB, decoded by nearest CelebAMask-HQ colour),
    optional ``sketches/``, optional ``captions/{id}.txt``.
``folder``
    images (jpg, jpeg, png, webp) directly in ``root``; optional ``masks/`` and ``sketches/`` with
    the same stems; optional ``captions.jsonl`` with lines ``{"id" | "file", "captions" | "caption",
    "split"?}``.

Splits: a numeric id below ``test_from`` (27,000 by default, the MM-CelebA-HQ split) is ``train``,
other numeric ids are ``test``. Non-numeric ids are ``train``. The ``folder`` layout takes the split
from ``captions.jsonl`` and otherwise only applies the id rule when ``test_from`` is given.

Label maps keep the mask's native size (CelebAMask-HQ masks are 512 for 1024 images); a mask
whose aspect ratio differs from its image's is an error, a different scale is not.
Readers hold only paths and options so that they pickle cheaply to Ray workers; side files
(``text.json``, ``captions.jsonl``) are parsed lazily once per process.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from modeling.conditions import NUM_CLASSES, color_to_labels
from pipelines.data.layouts import CELEBAMASK_PARTS

DEFAULT_TEST_FROM = 27_000
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
_ASPECT_TOLERANCE = 0.01


@dataclass
class FaceRecord:
    """One face: RGB image, optional 19-class label map and sketch, raw captions."""

    id: str
    split: str
    image: np.ndarray  # HxWx3 uint8 RGB
    label_map: np.ndarray | None = None  # hxw uint8 in 0..18, at the mask file's own size
    sketch: np.ndarray | None = None  # HxW uint8, white background with dark lines
    captions: list[str] = field(default_factory=list)


class RecordError(Exception):
    """A record that cannot be used; ``reason`` names the file and what was expected."""

    def __init__(self, record_id: str, reason: str) -> None:
        super().__init__(record_id, reason)
        self.record_id = record_id
        self.reason = reason

    def __str__(self) -> str:
        return f"record {self.record_id}: {self.reason}"


def _id_sort_key(record_id: str) -> tuple[int, int, str]:
    return (0, int(record_id), "") if record_id.isdigit() else (1, 0, record_id)


def sorted_ids(ids: set[str] | list[str]) -> list[str]:
    """Numeric ids in numeric order first, then the others in string order."""
    return sorted(ids, key=_id_sort_key)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def entry_problem(path: Path) -> str | None:
    """Why the directory entry ``path`` cannot be read as a file ("is a folder", "is a broken symlink", ...);
    None when it is a regular file, or when nothing is there at all."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a broken symlink (to {os.readlink(path)}, which does not exist)"
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"is a symlink loop ({exc.strerror})"
        return f"cannot be opened ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


class DatasetReader(ABC):
    """Lists record ids cheaply and reads one record at a time; never lets a decoding error escape."""

    layout: ClassVar[str]

    def __init__(self, root: str | Path, *, test_from: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.layout}: dataset root {self.root} does not exist or is not a folder")
        self.test_from = DEFAULT_TEST_FROM if test_from is None else int(test_from)
        self._cache: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Parsed side files stay behind: each worker re-reads them instead of receiving them pickled.
        return {**self.__dict__, "_cache": {}}

    @abstractmethod
    def ids(self) -> list[str]:
        """All record ids, sorted (numeric ids numerically)."""

    @abstractmethod
    def read(self, record_id: str) -> FaceRecord:
        """Read one record; raises ``RecordError`` for any unusable input."""

    def split_of(self, record_id: str) -> str:
        if record_id.isdigit():
            return "train" if int(record_id) < self.test_from else "test"
        return "train"

    def __iter__(self) -> Iterator[FaceRecord | RecordError]:
        for record_id in self.ids():
            try:
                yield self.read(record_id)
            except RecordError as err:
                yield err

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, test_from={self.test_from})"

    # ---- shared decoding helpers -------------------------------------------------------------

    def _require_dir(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise ValueError(f"{self.layout}: expected a {name}/ folder under {self.root}")
        return path

    def _open(self, record_id: str, path: Path, what: str) -> Image.Image:
        """Open and fully decode ``path``; every decoder failure becomes a ``RecordError``."""
        try:
            with Image.open(path) as img:
                img.load()
                # close() on leaving the block frees the decoded data, so hand back a copy
                return img.copy()
        except FileNotFoundError:
            raise RecordError(record_id, f"{what} {_relative(path, self.root)} is missing") from None
        except UnidentifiedImageError:
            raise RecordError(
                record_id, f"{what} {_relative(path, self.root)} is unreadable (empty or not an image file)"
            ) from None
        # PIL signals bad data with many types (OSError, SyntaxError, ValueError, struct.error,
        # DecompressionBombError, ...); at this boundary all of them mean "unreadable file".
        except Exception as exc:
            raise RecordError(
                record_id, f"{what} {_relative(path, self.root)} is unreadable ({type(exc).__name__}: {exc})"
            ) from None

    def _image(self, record_id: str, path: Path) -> np.ndarray:
        # np.array, not np.asarray: PIL's buffer is read-only and transforms may work in place.
        return np.array(self._open(record_id, path, "image").convert("RGB"))

    def _label_mask(self, record_id: str, path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
        """A mask file that holds labels directly (L, P, I) or colour-coded (RGB)."""
        img = self._open(record_id, path, "mask")
        if img.mode in ("L", "P", "I", "I;16", "1"):
            labels = np.asarray(img if img.mode != "1" else img.convert("L"))
        else:
            rgb = np.asarray(img.convert("RGB"))
            # A grey RGB image is a label map saved as RGB; anything with colour is colour-coded.
            if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
                labels = rgb[..., 0]
            else:
                labels = color_to_labels(rgb)
        if labels.size and (int(labels.max()) >= NUM_CLASSES or int(labels.min()) < 0):
            raise RecordError(
                record_id,
                f"mask {_relative(path, self.root)}: label values out of range "
                f"(min {int(labels.min())}, max {int(labels.max())}, expected 0..{NUM_CLASSES - 1})",
            )
        labels = labels.astype(np.uint8)
        self._check_aspect(record_id, path, labels.shape, image_shape)
        return labels

    def _sketch(self, record_id: str, path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
        sketch = np.array(self._open(record_id, path, "sketch").convert("L"))
        self._check_aspect(record_id, path, sketch.shape, image_shape)
        # Lines are sparse, so a mostly dark sketch is an inverted one (light lines on black).
        if sketch.mean() < 128:
            sketch = 255 - sketch
        return sketch

    def _check_aspect(self, record_id: str, path: Path, shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
        h, w = shape[:2]
        ih, iw = image_shape[:2]
        if abs(h / w - ih / iw) > _ASPECT_TOLERANCE * ih / iw:
            raise RecordError(
                record_id,
                f"{_relative(path, self.root)} is {w}x{h} but the image is {iw}x{ih}: "
                "aspect ratios differ, so it cannot be resized to match",
            )

    def _caption_lines(self, record_id: str, path: Path) -> list[str]:
        if not path.is_file():
            problem = entry_problem(path)
            if problem:
                raise RecordError(record_id, f"captions {_relative(path, self.root)} {problem}")
            return []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecordError(record_id, f"captions {_relative(path, self.root)} unreadable ({exc})") from None
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _find_image(self, record_id: str, folder: Path, what: str) -> Path | None:
        """The single file ``folder/{record_id}.{ext}`` (extension in either case); None if there is none, error
        if ambiguous or if the entry is there but is no file (a folder, a broken or looping symlink)."""
        found = []
        for suffixes in (IMAGE_SUFFIXES, tuple(s.upper() for s in IMAGE_SUFFIXES)):
            for suffix in suffixes:
                path = folder / f"{record_id}{suffix}"
                if path.is_file():
                    found.append(path)
                elif problem := entry_problem(path):
                    raise RecordError(record_id, f"{what} {_relative(path, self.root)} {problem}")
            if found:  # lower case first: on a case-insensitive disk the upper-case names are the same files
                break
        if len(found) > 1:
            names = ", ".join(_relative(p, self.root) for p in found)
            raise RecordError(record_id, f"ambiguous {what}: {names}")
        return found[0] if found else None

    def _no_image(self, record_id: str, folder: Path, expected: str) -> RecordError:
        """The reject for an id whose image was not found: names what is there instead, if anything."""
        others = sorted(e.name for e in os.scandir(folder) if os.path.splitext(e.name)[0] == record_id)
        if others:
            names = ", ".join(_relative(folder / name, self.root) for name in others)
            return RecordError(
                record_id, f"image {names}: unsupported extension (expected one of {', '.join(IMAGE_SUFFIXES)})"
            )
        return RecordError(record_id, f"image {expected} is missing")


def _stems(folder: Path) -> set[str]:
    # Every entry with an image name is an input, files or not: a folder or a broken link named 12.jpg is
    # rejected by ``read`` with that name instead of silently missing from the counts.
    return {p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}


class CelebAMaskHQReader(DatasetReader):
    layout = "celebamask-hq"
    IMAGE_DIR = "CelebA-HQ-img"
    MASK_DIR = "CelebAMask-HQ-mask-anno"
    CAPTION_DIR = "celeba-caption"
    IDS_PER_MASK_FOLDER = 2000

    def __init__(self, root: str | Path, *, test_from: int | None = None) -> None:
        super().__init__(root, test_from=test_from)
        self._require_dir(self.IMAGE_DIR)
        synth_meta = self.root / "synth.json"
        if test_from is None and synth_meta.is_file():
            self.test_from = int(json.loads(synth_meta.read_text())["test_from"])

    def ids(self) -> list[str]:
        # Inputs are the image-named entries plus any numbered entry ("13.bmp", "80.txt"): ``read`` rejects
        # the ones that are not an official, unpadded "{n}.jpg" image, naming the file.
        folder = self.root / self.IMAGE_DIR
        numbered = {os.path.splitext(name)[0] for name in os.listdir(folder) if os.path.splitext(name)[0].isdigit()}
        return sorted_ids(_stems(folder) | numbered)

    def part_path(self, record_id: str, part: str) -> Path:
        n = int(record_id)
        return self.root / self.MASK_DIR / str(n // self.IDS_PER_MASK_FOLDER) / f"{n:05d}_{part}.png"

    def read(self, record_id: str) -> FaceRecord:
        folder = self.root / self.IMAGE_DIR
        image_path = self._find_image(record_id, folder, "image")
        if image_path is None:
            raise self._no_image(record_id, folder, f"{self.IMAGE_DIR}/{record_id}.jpg")
        if not (record_id.isdigit() and str(int(record_id)) == record_id):
            raise RecordError(
                record_id,
                f"image {_relative(image_path, self.root)}: not a CelebA-HQ image name "
                "(expected an unpadded number like 123.jpg, whose masks and captions share that number)",
            )
        image = self._image(record_id, image_path)
        return FaceRecord(
            id=record_id,
            split=self.split_of(record_id),
            image=image,
            label_map=self._merge_parts(record_id, image.shape),
            sketch=None,
            captions=self._caption_lines(record_id, self.root / self.CAPTION_DIR / f"{record_id}.txt"),
        )

    def _merge_parts(self, record_id: str, image_shape: tuple[int, ...]) -> np.ndarray:
        label_map: np.ndarray | None = None
        first_path: Path | None = None
        for label, part in enumerate(CELEBAMASK_PARTS, start=1):
            path = self.part_path(record_id, part)
            if not path.is_file():
                problem = entry_problem(path)
                if problem:  # a part that is there but cannot be read must not silently become background
                    raise RecordError(record_id, f"mask part {_relative(path, self.root)} {problem}")
                continue  # absent parts are normal: most faces have no hat
            img = self._open(record_id, path, "mask part")
            if img.mode in ("L", "1", "I", "I;16"):
                on = np.asarray(img) != 0
            else:
                on = (np.asarray(img.convert("RGB")) != 0).any(axis=2)
            if label_map is None:
                label_map = np.zeros(on.shape, dtype=np.uint8)
                first_path = path
                self._check_aspect(record_id, path, on.shape, image_shape)
            elif on.shape != label_map.shape:
                raise RecordError(
                    record_id,
                    f"mask part {_relative(path, self.root)} is {on.shape[1]}x{on.shape[0]} but "
                    f"{_relative(first_path, self.root)} is {label_map.shape[1]}x{label_map.shape[0]}",
                )
            label_map[on] = label
        if label_map is None:
            folder = self.part_path(record_id, "skin").parent
            raise RecordError(
                record_id, f"no mask parts: expected {_relative(folder, self.root)}/{int(record_id):05d}_<part>.png"
            )
        return label_map


class MMCelebAHQReader(DatasetReader):
    layout = "mmcelebahq"

    def __init__(self, root: str | Path, *, test_from: int | None = None) -> None:
        super().__init__(root, test_from=test_from)
        self._require_dir("face")
        self._captions_index()  # a broken text.json is a dataset problem: say so before reading

    def ids(self) -> list[str]:
        return sorted_ids(_stems(self.root / "face"))

    def _captions_index(self) -> dict[str, Any]:
        if "text" not in self._cache:
            path = self.root / "text.json"
            index: Any = {}
            if path.is_file():
                try:
                    index = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"{path} is not readable JSON ({exc})") from None
                if not isinstance(index, dict):
                    raise ValueError(f"{path} must map '{{id}}.jpg' to a list of captions")
            self._cache["text"] = index
        return self._cache["text"]

    def read(self, record_id: str) -> FaceRecord:
        image_path = self._find_image(record_id, self.root / "face", "image")
        if image_path is None:
            raise self._no_image(record_id, self.root / "face", f"face/{record_id}.jpg")
        image = self._image(record_id, image_path)
        mask_path = self._find_image(record_id, self.root / "mask", "mask")
        if mask_path is None:
            raise RecordError(record_id, f"mask mask/{record_id}.png is missing")
        index = self._captions_index()
        captions = index.get(image_path.name, index.get(f"{record_id}.jpg", []))
        return FaceRecord(
            id=record_id,
            split=self.split_of(record_id),
            image=image,
            label_map=self._label_mask(record_id, mask_path, image.shape),
            sketch=None,
            captions=_caption_list(record_id, captions, "text.json"),
        )


class MMFaceReader(DatasetReader):
    layout = "mmface"

    def __init__(self, root: str | Path, *, test_from: int | None = None) -> None:
        super().__init__(root, test_from=test_from)
        self._require_dir("images")

    def ids(self) -> list[str]:
        return sorted_ids(_stems(self.root / "images"))

    def read(self, record_id: str) -> FaceRecord:
        image_path = self._find_image(record_id, self.root / "images", "image")
        if image_path is None:
            raise self._no_image(record_id, self.root / "images", f"images/{record_id}.<jpg|png>")
        image = self._image(record_id, image_path)
        mask_path = self._find_image(record_id, self.root / "masks", "mask")
        sketch_path = self._find_image(record_id, self.root / "sketches", "sketch")
        return FaceRecord(
            id=record_id,
            split=self.split_of(record_id),
            image=image,
            label_map=None if mask_path is None else self._label_mask(record_id, mask_path, image.shape),
            sketch=None if sketch_path is None else self._sketch(record_id, sketch_path, image.shape),
            captions=self._caption_lines(record_id, self.root / "captions" / f"{record_id}.txt"),
        )


class FolderReader(DatasetReader):
    layout = "folder"

    def __init__(self, root: str | Path, *, test_from: int | None = None) -> None:
        super().__init__(root, test_from=test_from)
        self._id_rule = test_from is not None
        self._index()  # a malformed captions.jsonl is a dataset problem: say so before reading

    def ids(self) -> list[str]:
        return sorted_ids(_stems(self.root))

    def _index(self) -> dict[str, dict[str, Any]]:
        """captions.jsonl parsed into ``{id: {"captions": [...], "split": str | None}}``."""
        if "index" in self._cache:
            return self._cache["index"]
        index: dict[str, dict[str, Any]] = {}
        path = self.root / "captions.jsonl"
        if path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path} is not readable UTF-8 text ({exc})") from None
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    key = entry["id"] if "id" in entry else Path(entry["file"]).stem
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"{path}:{n}: expected a JSON object with 'id' or 'file', got {line[:80]!r}"
                    ) from None
                captions = entry.get("captions", entry.get("caption", []))
                split = entry.get("split")
                if split is not None and split not in ("train", "test"):
                    raise ValueError(f"{path}:{n}: split must be 'train' or 'test', got {split!r}")
                index[str(key)] = {"captions": captions, "split": split}
        self._cache["index"] = index
        return index

    def split_of(self, record_id: str) -> str:
        split = self._index().get(record_id, {}).get("split")
        if split is not None:
            return split
        return super().split_of(record_id) if self._id_rule else "train"

    def read(self, record_id: str) -> FaceRecord:
        image_path = self._find_image(record_id, self.root, "image")
        if image_path is None:
            raise self._no_image(record_id, self.root, f"{record_id}.<jpg|jpeg|png|webp>")
        image = self._image(record_id, image_path)
        mask_path = self._find_image(record_id, self.root / "masks", "mask")
        sketch_path = self._find_image(record_id, self.root / "sketches", "sketch")
        entry = self._index().get(record_id, {})
        return FaceRecord(
            id=record_id,
            split=self.split_of(record_id),
            image=image,
            label_map=None if mask_path is None else self._label_mask(record_id, mask_path, image.shape),
            sketch=None if sketch_path is None else self._sketch(record_id, sketch_path, image.shape),
            captions=_caption_list(record_id, entry.get("captions", []), "captions.jsonl"),
        )


def _caption_list(record_id: str, value: Any, source: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RecordError(record_id, f"{source}: captions must be a string or a list of strings")
    return [c.strip() for c in value if c.strip()]


LAYOUTS: dict[str, type[DatasetReader]] = {
    cls.layout: cls for cls in (CelebAMaskHQReader, MMCelebAHQReader, MMFaceReader, FolderReader)
}


def open_reader(layout: str, root: str | Path, **options: Any) -> DatasetReader:
    """The reader for ``layout`` over ``root``; ``ValueError`` names the known layouts or the missing folder."""
    try:
        cls = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}") from None
    return cls(root, **options)


def check_dataset(reader: DatasetReader, *, limit: int | None = None) -> dict[str, Any]:
    """Read every record (or the first ``limit``) and count what is usable.

    ``splits`` and the ``with_*`` counts are over readable records; ``problems`` lists the others.
    """
    ids = reader.ids()
    if limit is not None:
        ids = ids[:limit]
    splits: dict[str, int] = {}
    counts = {"with_mask": 0, "with_sketch": 0, "with_captions": 0}
    problems: list[dict[str, str]] = []
    for record_id in ids:
        try:
            record = reader.read(record_id)
        except RecordError as err:
            problems.append({"id": err.record_id, "reason": err.reason})
            continue
        splits[record.split] = splits.get(record.split, 0) + 1
        counts["with_mask"] += record.label_map is not None
        counts["with_sketch"] += record.sketch is not None
        counts["with_captions"] += bool(record.captions)
    return {
        "layout": reader.layout,
        "root": str(reader.root),
        "n_ids": len(ids),
        "n_ok": len(ids) - len(problems),
        "n_bad": len(problems),
        "splits": dict(sorted(splits.items(), key=lambda kv: (kv[0] != "train", kv[0]))),
        **counts,
        "problems": problems,
    }
