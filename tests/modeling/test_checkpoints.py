"""Which checkpoint a resumed run (and serving) picks from a run folder."""

import json
import os

import pytest

from modeling.checkpoints import (
    MANIFEST_FILE,
    STATE_FILE,
    DamagedCheckpoint,
    checkpoint_name,
    damage,
    file_records,
    is_complete,
    latest_checkpoint,
    newest_complete,
    rank_marker,
    resolve_checkpoint,
    stale_checkpoints,
    verify,
    write_manifest,
)


def _checkpoint(run_dir, name, step, world, ranks_done):
    path = run_dir / f"checkpoint_{name}"
    path.mkdir(parents=True)
    state = {"step": step, "epoch": 1, "ema_updates": step}
    if world is not None:
        state["world"] = world
    (path / STATE_FILE).write_text(json.dumps(state))
    for rank in ranks_done:
        (path / rank_marker(rank)).touch()
    return path


def test_the_newest_checkpoint_every_rank_finished_wins(tmp_path):
    _checkpoint(tmp_path, "a", step=4, world=2, ranks_done=[0, 1])
    best = _checkpoint(tmp_path, "b", step=8, world=2, ranks_done=[0, 1])
    _checkpoint(tmp_path, "c", step=12, world=2, ranks_done=[0])  # rank 1 died before its state was in
    (tmp_path / "checkpoint_d").mkdir()  # a report that never got rank 0's state file
    assert newest_complete(tmp_path) == best
    assert latest_checkpoint(tmp_path) == best


def test_checkpoints_from_before_rank_markers_still_count(tmp_path):
    old = _checkpoint(tmp_path, "a", step=6, world=None, ranks_done=[])
    assert newest_complete(tmp_path) == old


def test_a_run_folder_without_checkpoints(tmp_path):
    assert newest_complete(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        latest_checkpoint(tmp_path)


# --------------------------------------------------------------------------- manifests: the real layout by hand


def _saved(run_dir, step, world=2, with_manifest=True):
    """A checkpoint as the trainer leaves it: DeepSpeed state per rank, rank markers, rank 0's serving weights
    and trainer state, and (once every rank's files are in) the manifest of them all."""
    path = run_dir / checkpoint_name(step)
    files = {
        "deepspeed/latest": b"state",
        "deepspeed/state/mp_rank_00_model_states.pt": bytes(range(256)) * 8,
        "weights/config.json": b'{"arch": "mmface-dit"}',
        "weights/model.safetensors": bytes(4096),
        "weights/ema.safetensors": bytes(4096),
        STATE_FILE: json.dumps({"step": step, "epoch": 1, "ema_updates": step, "world": world, "manifest": 1}),
    }
    for rank in range(world):
        files[f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = bytes([rank]) * 3000
        files[rank_marker(rank)] = b""
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    if with_manifest:
        write_manifest(path, file_records(path))
    return path


def _truncate(path, keep_bytes=100):
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_a_truncated_file_sends_discovery_to_the_previous_checkpoint_and_says_why(tmp_path, capsys):
    previous = _saved(tmp_path, 4)
    newest = _saved(tmp_path, 8)
    assert newest_complete(tmp_path) == newest
    _truncate(newest / "weights" / "model.safetensors")
    assert not is_complete(newest)
    assert newest_complete(tmp_path) == previous
    assert (
        "skipped checkpoint_000008: weights/model.safetensors is 100 bytes, the manifest says 4096; "
        "using checkpoint_000004" in capsys.readouterr().err
    )
    assert latest_checkpoint(tmp_path, deep=True) == previous


def test_a_truncated_deepspeed_state_is_as_damaged_as_truncated_weights(tmp_path):
    previous = _saved(tmp_path, 4)
    newest = _saved(tmp_path, 8)
    _truncate(newest / "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert newest_complete(tmp_path, deep=True) == previous
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is 100 bytes" in damage(newest)


def test_a_checkpoint_without_its_manifest_is_unfinished_even_with_every_marker(tmp_path):
    previous = _saved(tmp_path, 4)
    unfinished = _saved(tmp_path, 8, with_manifest=False)  # e.g. the disk filled before the manifest
    assert damage(unfinished) == "no manifest.json (the save never finished)"
    assert newest_complete(tmp_path) == previous


def test_checksums_catch_what_sizes_cannot_and_a_named_damaged_checkpoint_is_refused(tmp_path):
    previous = _saved(tmp_path, 4)
    newest = _saved(tmp_path, 8)
    ema = newest / "weights" / "ema.safetensors"
    ema.write_bytes(b"\x01" + ema.read_bytes()[1:])  # same size, one byte flipped
    assert is_complete(newest) and newest_complete(tmp_path) == newest
    assert newest_complete(tmp_path, deep=True) == previous
    with pytest.raises(DamagedCheckpoint, match="checkpoint_000008: weights/ema.safetensors does not match its sha256"):
        verify(newest, deep=True)
    with pytest.raises(DamagedCheckpoint, match="checkpoint_000008"):
        resolve_checkpoint(newest, deep=True)
    assert resolve_checkpoint(tmp_path, deep=True) == previous.resolve()
    _truncate(newest / "weights" / "model.safetensors")
    with pytest.raises(DamagedCheckpoint, match="weights/model.safetensors is 100 bytes"):
        resolve_checkpoint(newest / "weights")  # serving a checkpoint's weights folder checks the checkpoint


def test_a_manifest_is_never_written_over_a_short_copy(tmp_path):
    path = _saved(tmp_path, 4, with_manifest=False)
    records = file_records(path)
    _truncate(path / "weights" / "model.safetensors")
    with pytest.raises(DamagedCheckpoint, match="model.safetensors is 100 bytes, the manifest says 4096"):
        write_manifest(path, records)
    assert not (path / MANIFEST_FILE).exists()


def test_rotation_keeps_exactly_keep_complete_checkpoints_and_drops_older_leftovers(tmp_path):
    # what an interrupted run leaves: a checkpoint Ray never registered, a leftover without its manifest
    oldest, middle = _saved(tmp_path, 2), _saved(tmp_path, 4)
    leftover = _saved(tmp_path, 6, with_manifest=False)
    newest = _saved(tmp_path, 8)
    in_progress = _saved(tmp_path, 10, with_manifest=False)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's list of them: not a checkpoint
    (tmp_path / "checkpoint_2024-01-01_00-00-00.000000").mkdir()  # Ray's own naming, never got a state file
    os.utime(tmp_path / "checkpoint_2024-01-01_00-00-00.000000", (0, 0))
    stale = stale_checkpoints(tmp_path, keep=2)
    assert set(stale) == {oldest, leftover, tmp_path / "checkpoint_2024-01-01_00-00-00.000000"}
    assert middle not in stale and newest not in stale and in_progress not in stale
