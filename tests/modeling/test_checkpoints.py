"""Which checkpoint a resumed run (and serving) picks from a run folder."""

import json

import pytest

from modeling.checkpoints import STATE_FILE, latest_checkpoint, newest_complete, rank_marker


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
