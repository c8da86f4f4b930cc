"""Readers over real files in each layout: what a record holds, how splits fall, how bad inputs are reported."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from modeling.conditions import CELEBAMASK_COLORS, CLASS_NAMES, color_to_labels, labels_to_color
from pipelines.data.layouts import CELEBAMASK_PARTS
from pipelines.data.readers import (
    LAYOUTS,
    DatasetReader,
    FaceRecord,
    RecordError,
    check_dataset,
    open_reader,
)
from pipelines.data.transforms import clean_captions

from .conftest import NO_CAPTION, BuiltDataset, damage_celebamask, save_jpeg, save_png


def reference_merge(parts: dict[str, np.ndarray]) -> np.ndarray:
    """CelebAMask-HQ's rule written out independently: part k+1 paints label k+1 over lower labels."""
    shape = next(iter(parts.values())).shape
    merged = np.zeros(shape, dtype=np.uint8)
    for label in range(1, 19):
        name = CELEBAMASK_PARTS[label - 1]
        if name in parts:
            merged = np.where(parts[name], label, merged).astype(np.uint8)
    return merged


def read_all(reader: DatasetReader) -> tuple[dict[str, FaceRecord], dict[str, RecordError]]:
    good, bad = {}, {}
    for item in reader:
        if isinstance(item, RecordError):
            bad[item.record_id] = item
        else:
            good[item.id] = item
    return good, bad


def assert_bad_as_expected(bad: dict[str, RecordError], built: BuiltDataset) -> None:
    assert set(bad) == set(built.bad)
    for record_id, expected in built.bad.items():
        assert expected in bad[record_id].reason, (record_id, bad[record_id].reason)


# ---- vocabulary ------------------------------------------------------------------------------


def test_vocabulary_matches_spec_order() -> None:
    assert len(CLASS_NAMES) == 19 and CLASS_NAMES[0] == "background"
    parts = "skin nose eye_g l_eye r_eye l_brow r_brow l_ear r_ear mouth u_lip l_lip hair hat ear_r neck_l neck cloth"
    assert CELEBAMASK_PARTS == tuple(parts.split())
    assert CELEBAMASK_COLORS.shape == (19, 3) and CELEBAMASK_COLORS.dtype == np.uint8
    assert tuple(CELEBAMASK_COLORS[13]) == (0, 0, 204) and tuple(CELEBAMASK_COLORS[18]) == (0, 204, 0)
    assert len({tuple(c) for c in CELEBAMASK_COLORS}) == 19


def test_colour_round_trip_and_nearest_colour() -> None:
    labels = np.arange(19, dtype=np.uint8).repeat(4).reshape(4, 19)
    assert np.array_equal(color_to_labels(labels_to_color(labels)), labels)
    # The closest palette colours are 51 apart, so per-channel errors under 51 / 2 / sqrt(3) always decode.
    noisy = labels_to_color(labels).astype(np.int16) + np.random.default_rng(0).integers(-14, 15, (4, 19, 3))
    assert np.array_equal(color_to_labels(np.clip(noisy, 0, 255).astype(np.uint8)), labels)
    with pytest.raises(ValueError, match="0..18"):
        labels_to_color(np.array([[19]], dtype=np.uint8))


# ---- celebamask-hq ---------------------------------------------------------------------------


def test_celebamask_label_maps_equal_reference_merge(celebamask_dataset: BuiltDataset) -> None:
    reader = open_reader("celebamask-hq", celebamask_dataset.root)
    good, bad = read_all(reader)
    assert set(good) == set(celebamask_dataset.parts)
    for record_id, parts in celebamask_dataset.parts.items():
        record = good[record_id]
        expected = reference_merge(parts)
        assert record.label_map.dtype == np.uint8
        # Native mask size is kept (32 for a 64 image); resizing is the transform's job.
        assert record.label_map.shape == (32, 32) and record.image.shape == (64, 64, 3)
        assert np.array_equal(record.label_map, expected), record_id
        assert record.sketch is None
        assert record.image.flags.writeable and record.label_map.flags.writeable
    # The rectangles overlap, so at least one pixel shows a later part winning over an earlier one.
    assert any((sum(m.astype(int) for m in p.values()) > 1).any() for p in celebamask_dataset.parts.values())
    assert_bad_as_expected(bad, celebamask_dataset)


def test_celebamask_ids_splits_and_captions(celebamask_dataset: BuiltDataset) -> None:
    reader = open_reader("celebamask-hq", celebamask_dataset.root)
    assert reader.ids() == ["0", "1", "5", "6", "7", "8", "9", "2001", "3999", "26001", "27001"]
    assert [reader.split_of(i) for i in ("0", "26001", "26999", "27000", "27001")] == [
        "train",
        "train",
        "train",
        "test",
        "test",
    ]
    assert reader.read("0").captions == celebamask_dataset.captions["0"]
    assert reader.read("2001").captions == ["only one"]
    assert reader.read("1").captions == []
    moved = open_reader("celebamask-hq", celebamask_dataset.root, test_from=2000)
    assert moved.read("2001").split == "test" and moved.read("1").split == "train"


def test_celebamask_split_follows_synth_json(celebamask_dataset: BuiltDataset) -> None:
    (celebamask_dataset.root / "synth.json").write_text('{"n": 4000, "size": 64, "seed": 0, "test_from": 3000}')
    reader = open_reader("celebamask-hq", celebamask_dataset.root)
    assert reader.split_of("2001") == "train" and reader.split_of("3999") == "test"
    # An explicit option wins over the file.
    assert open_reader("celebamask-hq", celebamask_dataset.root, test_from=1).split_of("1") == "test"


def test_check_dataset_counts_and_problems(celebamask_dataset: BuiltDataset) -> None:
    report = check_dataset(open_reader("celebamask-hq", celebamask_dataset.root))
    assert report["layout"] == "celebamask-hq" and report["root"] == str(celebamask_dataset.root)
    assert (report["n_ids"], report["n_ok"], report["n_bad"]) == (11, 5, 6)
    assert report["splits"] == {"train": 4, "test": 1}
    assert (report["with_mask"], report["with_sketch"], report["with_captions"]) == (5, 0, 2)
    assert {p["id"] for p in report["problems"]} == set(celebamask_dataset.bad)
    assert all(p["reason"] for p in report["problems"])
    assert check_dataset(open_reader("celebamask-hq", celebamask_dataset.root), limit=3)["n_ids"] == 3


def test_reader_and_errors_pickle_for_ray_workers(celebamask_dataset: BuiltDataset) -> None:
    reader = open_reader("celebamask-hq", celebamask_dataset.root, test_from=100)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.ids() == reader.ids() and clone.test_from == 100
    assert np.array_equal(clone.read("1").label_map, reader.read("1").label_map)
    with pytest.raises(RecordError) as caught:
        reader.read("6")
    err = pickle.loads(pickle.dumps(caught.value))
    assert (err.record_id, err.reason) == ("6", caught.value.reason)
    assert "6" in str(err) and "no mask parts" in str(err)


def test_celebamask_every_damaged_entry_is_an_id_read_or_rejected_naming_the_file(synth_root, tmp_path) -> None:
    """Folders, broken links, link loops, wrong extensions and padded duplicates in the image folder are inputs
    too: each is listed as an id and rejected with the file's name, never silently skipped."""
    root = tmp_path / "faces"
    shutil.copytree(synth_root, root, symlinks=True)
    expected = damage_celebamask(root)
    reader = open_reader("celebamask-hq", root)
    n = len(list((synth_root / "CelebA-HQ-img").iterdir()))
    assert set(reader.ids()) == {str(i) for i in range(n)} | {"016", "80", "cover"}
    good, bad = read_all(reader)
    assert set(good) | set(bad) == set(reader.ids()) and not set(good) & set(bad)
    assert set(bad) == {i for i, fragment in expected.items() if fragment not in (None, NO_CAPTION)}
    for record_id, fragment in expected.items():
        if fragment == NO_CAPTION:
            assert clean_captions(good[record_id].captions) == []
        elif fragment is not None:
            assert fragment in bad[record_id].reason, (record_id, bad[record_id].reason)
    report = check_dataset(reader)
    assert report["n_ids"] == report["n_ok"] + report["n_bad"] == n + 3


def test_celebamask_part_that_cannot_be_opened_rejects_instead_of_going_missing(synth_root, tmp_path) -> None:
    root = tmp_path / "faces"
    shutil.copytree(synth_root, root, symlinks=True)
    hair = root / "CelebAMask-HQ-mask-anno" / "0" / "00002_hair.png"
    hair.unlink()
    hair.symlink_to(hair.name)
    with pytest.raises(RecordError, match=r"mask part CelebAMask-HQ-mask-anno/0/00002_hair.png is a symlink loop"):
        open_reader("celebamask-hq", root).read("2")


# ---- mmcelebahq ------------------------------------------------------------------------------


def test_mmcelebahq_records(mmcelebahq_dataset: BuiltDataset) -> None:
    reader = open_reader("mmcelebahq", mmcelebahq_dataset.root)
    assert reader.ids() == ["0", "3", "4", "12", "27000"]
    good, bad = read_all(reader)
    assert set(good) == set(mmcelebahq_dataset.labels)
    for record_id, labels in mmcelebahq_dataset.labels.items():
        assert np.array_equal(good[record_id].label_map, labels), record_id  # "12" is a palette PNG
        assert good[record_id].captions == mmcelebahq_dataset.captions[record_id]
    assert good["27000"].split == "test" and good["12"].split == "train"
    assert_bad_as_expected(bad, mmcelebahq_dataset)


def test_mmcelebahq_broken_text_json_is_a_dataset_error(mmcelebahq_dataset: BuiltDataset) -> None:
    (mmcelebahq_dataset.root / "text.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="text.json"):
        open_reader("mmcelebahq", mmcelebahq_dataset.root)


# ---- mmface ----------------------------------------------------------------------------------


def test_mmface_records(mmface_dataset: BuiltDataset) -> None:
    reader = open_reader("mmface", mmface_dataset.root)
    assert reader.ids() == ["7", "8", "9", "30", "27500", "ffhq_a"]
    good, bad = read_all(reader)
    for record_id, labels in mmface_dataset.labels.items():
        record = good[record_id]
        assert np.array_equal(record.label_map, labels), record_id
        assert np.array_equal(record.sketch, mmface_dataset.sketches[record_id]), record_id
        assert record.captions == mmface_dataset.captions[record_id]
    assert good["8"].label_map is None and good["8"].sketch is None and good["8"].captions == []
    assert [good[i].split for i in ("7", "27500", "ffhq_a")] == ["train", "test", "train"]
    assert_bad_as_expected(bad, mmface_dataset)


# ---- folder ----------------------------------------------------------------------------------


def test_folder_records(folder_dataset: BuiltDataset) -> None:
    reader = open_reader("folder", folder_dataset.root)
    assert reader.ids() == ["alice", "bob", "carol", "dave", "erin"]
    good, bad = read_all(reader)
    assert set(good) == {"alice", "bob", "carol", "dave"}
    assert good["alice"].image.shape == (32, 48, 3)
    assert np.array_equal(good["alice"].label_map, folder_dataset.labels["alice"])  # label PNG
    assert np.array_equal(good["bob"].label_map, folder_dataset.labels["bob"])  # colour-coded PNG
    assert np.array_equal(good["carol"].sketch, folder_dataset.sketches["carol"])
    assert good["dave"].label_map is None and good["dave"].sketch is None
    for record_id, captions in folder_dataset.captions.items():
        assert good[record_id].captions == captions, record_id
    assert {i: r.split for i, r in good.items()} == {"alice": "test", "bob": "train", "carol": "train", "dave": "train"}
    assert_bad_as_expected(bad, folder_dataset)


def test_folder_split_by_id_only_when_asked(tmp_path) -> None:
    rng = np.random.default_rng(5)
    for name in ("10", "20"):
        save_jpeg(tmp_path / f"{name}.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert [open_reader("folder", tmp_path).split_of(i) for i in ("10", "20")] == ["train", "train"]
    assert [open_reader("folder", tmp_path, test_from=15).split_of(i) for i in ("10", "20")] == ["train", "test"]


def test_folder_malformed_captions_jsonl(folder_dataset: BuiltDataset) -> None:
    with open(folder_dataset.root / "captions.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"captions": ["no id"]}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:\d+: expected a JSON object with 'id' or 'file'"):
        open_reader("folder", folder_dataset.root)


# ---- shared behaviour ------------------------------------------------------------------------


def test_open_reader_errors_name_the_problem(tmp_path) -> None:
    assert set(LAYOUTS) == {"celebamask-hq", "mmcelebahq", "mmface", "folder"}
    with pytest.raises(ValueError, match="known layouts: celebamask-hq, mmcelebahq, mmface, folder"):
        open_reader("ffhq", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        open_reader("folder", tmp_path / "missing")
    with pytest.raises(ValueError, match="CelebA-HQ-img/"):
        open_reader("celebamask-hq", tmp_path)
    with pytest.raises(ValueError, match="face/"):
        open_reader("mmcelebahq", tmp_path)


def test_bad_images_never_escape_as_pil_errors(tmp_path) -> None:
    rng = np.random.default_rng(6)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    (tmp_path / "images" / "text.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing valid")
    save_jpeg(tmp_path / "images" / "ok.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    save_png(tmp_path / "masks" / "ok.png", np.full((8, 8), 200, np.uint8))  # 200 > 18
    reader = open_reader("mmface", tmp_path)
    for record_id, expected in (
        ("empty", "images/empty.jpg is unreadable"),
        ("text", "images/text.png is unreadable"),
        ("ok", "label values out of range (min 200, max 200"),
    ):
        with pytest.raises(RecordError) as caught:
            reader.read(record_id)
        assert expected in caught.value.reason
    report = check_dataset(reader)
    assert report["n_ok"] == 0 and report["n_bad"] == 3


def test_grey_rgb_mask_is_read_as_labels(tmp_path) -> None:
    labels = np.random.default_rng(7).integers(0, 19, (12, 12), dtype=np.uint8)
    save_jpeg(tmp_path / "a.jpg", np.zeros((12, 12, 3), np.uint8))
    save_png(tmp_path / "masks" / "a.png", np.repeat(labels[..., None], 3, axis=2))
    assert Image.open(tmp_path / "masks" / "a.png").mode == "RGB"
    assert np.array_equal(open_reader("folder", tmp_path).read("a").label_map, labels)
