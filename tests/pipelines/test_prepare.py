"""Precompute: every record is a row or a reject, rows hold what the models need, re-runs resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from modeling.conditions import resize_image, resize_labels
from pipelines.cli import main
from pipelines.data.prepare import DONE_DIR, PrepareOptions, decode_field, inspect_field, load_manifest, prepare
from pipelines.data.readers import open_reader

from .conftest import damage_celebamask


def _rows(out: Path) -> dict[str, dict]:
    manifest = load_manifest(out)
    rows = {}
    for shard in manifest["shards"]:
        for row in pq.read_table(out / "shards" / shard["file"]).to_pylist():
            rows[row["id"]] = row
    return rows


@pytest.fixture(scope="module")
def broken_root(synth_root, tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """The synthetic faces with one fault of each kind the issues name, and what each damaged id must become."""
    root = tmp_path_factory.mktemp("broken") / "faces"
    shutil.copytree(synth_root, root)
    image_dir, mask_dir, caption_dir = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask-anno", root / "celeba-caption"
    data = (image_dir / "3.jpg").read_bytes()
    (image_dir / "3.jpg").write_bytes(data[: len(data) // 3])  # truncated image
    for part in (mask_dir / "0").glob("00004_*.png"):
        part.unlink()  # no mask parts at all
    (mask_dir / "0" / "00005_skin.png").write_bytes(b"garbage")  # unreadable part
    (caption_dir / "6.txt").write_text("[name]\n   \nCaption: [placeholder]\n")  # nothing usable
    from PIL import Image

    for part in (mask_dir / "0").glob("00007_*.png"):  # masks with another aspect ratio than the image
        Image.open(part).resize((64, 32)).save(part)
    expected = {"3": "unreadable", "4": "no mask parts", "5": "00005_skin.png", "6": "caption", "7": "aspect"}
    return root, {**expected, **damage_celebamask(root)}


def test_every_record_is_written_or_rejected_with_a_reason(ray_local, broken_root, tmp_path):
    root, expected = broken_root
    out = tmp_path / "out"
    manifest = prepare(PrepareOptions(layout="celebamask-hq", root=str(root), out=str(out)), progress=False)
    counts = manifest["counts"]
    # the 72 faces plus the 3 extra entries in the image folder (016.jpg, 80.txt, cover.jpg): none vanishes
    assert counts["n_input"] == 75 == counts["n_written"] + counts["n_rejected"]
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {i for i, fragment in expected.items() if fragment is not None}
    for record_id, fragment in expected.items():
        if fragment is not None:
            assert fragment in rejects[record_id], (record_id, rejects[record_id])
    rows = _rows(out)
    assert set(rows).isdisjoint(rejects) and len(rows) == counts["n_written"]
    assert set(rows) | set(rejects) == {str(i) for i in range(72)} | {"016", "80", "cover"}
    assert rows["32"]["captions"] == ["A face with red hair."]  # terminal colours and control bytes cleaned away
    # each record lands in the split its id names (synth.json: ids from test_from on are test), both splits
    # are present, and the per-split counts add up to what was written and rejected there
    split_of = open_reader("celebamask-hq", root).split_of
    assert {split_of(i) for i in rows} == {"train", "test"} and set(counts["splits"]) == {"train", "test"}
    for split, split_counts in counts["splits"].items():
        written = {i for i, row in rows.items() if row["split"] == split}
        assert written == {i for i in rows if split_of(i) == split}, split
        rejected = sum(split_of(i) == split for i in rejects)
        assert (split_counts["n_written"], split_counts["n_rejected"]) == (len(written), rejected), split
        assert split_counts["n_input"] == split_counts["n_written"] + split_counts["n_rejected"]


def test_rows_hold_latents_masks_and_text_for_both_models(prepared, synth_root):
    manifest = load_manifest(prepared)
    assert manifest["targets"] == ["mmface", "mogle"] and manifest["latent_shape"] == [12, 16, 16]
    assert manifest["text_dims"] == {"seq": 384, "pooled": 384}
    rows = _rows(prepared)
    reader = open_reader("celebamask-hq", synth_root)
    record = reader.read("10")
    row = rows["10"]
    fields = manifest["fields"]
    # mask labels: nearest resize of the reader's label map
    assert np.array_equal(decode_field(row, "mask_labels", fields["mask_labels"]), resize_labels(record.label_map, 32))
    # the pixel codec is lossless: the stored latent decodes to the resized image exactly
    latent = torch.from_numpy(decode_field(row, "image_latent", fields["image_latent"]).astype(np.float32))
    pixels = ((torch.nn.functional.pixel_shuffle(latent[None], 2)[0] + 1) * 127.5).round().byte().permute(1, 2, 0)
    assert np.array_equal(pixels.numpy(), resize_image(record.image, 32))
    # 20 MoGLE condition latents: global colour mask first, then one binary mask per class
    cond = decode_field(row, "cond_latents", fields["cond_latents"]).astype(np.float32)
    binary = (torch.nn.functional.pixel_shuffle(torch.from_numpy(cond[1:]), 2)[:, 0] > 0).numpy()
    labels = decode_field(row, "mask_labels", fields["mask_labels"])
    assert np.array_equal(binary, labels[None] == np.arange(19)[:, None, None])
    assert cond.shape == (20, 12, 16, 16)
    # text: one sequence per caption with its own mask, pooled vectors unit length
    k, tokens = row["n_captions"], row["text_tokens"]
    assert k == 10 and row["captions"][0]
    seq = decode_field(row, "text_seq", fields["text_seq"])
    mask = decode_field(row, "text_mask", fields["text_mask"])
    pooled = decode_field(row, "text_pooled", fields["text_pooled"]).astype(np.float32)
    assert seq.shape == (k, tokens, 384) and mask.shape == (k, tokens) and mask[:, 0].all()
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-2)
    for name in ("mask_latent", "sketch_latent"):
        assert decode_field(row, name, fields[name]).shape == (12, 16, 16)
    assert (prepared / "null_text.safetensors").is_file()


def test_rerun_skips_finished_shards_and_an_interrupted_run_ends_the_same(prepared, synth_root, tmp_path):
    manifest = load_manifest(prepared)
    marks = {p.name: p.stat().st_mtime_ns for p in (prepared / "shards").glob("*.parquet")}
    again = prepare(PrepareOptions(**{**manifest["options"], "out": str(prepared)}), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (prepared / "shards").glob("*.parquet")} == marks
    assert again["counts"] == manifest["counts"]

    # an interrupted run: some shards finished, one half-written, the rest not started
    interrupted = tmp_path / "interrupted"
    shutil.copytree(prepared, interrupted)
    shards = sorted((interrupted / "shards").glob("*.parquet"))
    for shard in shards[1:]:
        (interrupted / "shards" / DONE_DIR / f"{shard.stem}.json").unlink()
        shard.unlink()
    (interrupted / "shards" / f"{shards[1].stem}.parquet.tmp123").write_bytes(b"half a file")
    # damaged since it finished: a truncated shard (done marker intact) and a garbled null file are redone
    shards[0].write_bytes(shards[0].read_bytes()[:1000])
    (interrupted / "null_text.safetensors").write_bytes(b"\xff" * 64)
    (interrupted / "manifest.json").unlink()
    (interrupted / "rejects.jsonl").unlink()
    resumed = prepare(PrepareOptions(**{**manifest["options"], "out": str(interrupted)}), progress=False)
    assert resumed["counts"] == manifest["counts"] and resumed["shards"] == manifest["shards"]
    original, redone = _rows(prepared), _rows(interrupted)
    assert original.keys() == redone.keys()
    assert all(original[i] == redone[i] for i in original)
    assert (interrupted / "null_text.safetensors").read_bytes() == (prepared / "null_text.safetensors").read_bytes()


def test_cli_check_inspect_and_errors(prepared, synth_root, tmp_path, capsys):
    assert main(["data", "check", "--layout", "celebamask-hq", "--root", str(synth_root)]) == 0
    assert '"n_ok": 72' in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", "--layout", "mmface", "--root", str(empty)]) in (1, 2)
    npy = tmp_path / "labels.npy"
    assert main(["data", "inspect", str(prepared), "--id", "10", "--field", "mask_labels", "--out", str(npy)]) == 0
    assert np.array_equal(np.load(npy), inspect_field(prepared, "10", "mask_labels"))
    assert main(["data", "inspect", str(prepared), "--id", "nope", "--field", "mask_labels", "--out", str(npy)]) == 2
    assert "rejects.jsonl" in capsys.readouterr().err
    assert main(["data", "prepare", "--layout", "nope", "--root", str(empty), "--out", str(tmp_path / "x")]) == 2
