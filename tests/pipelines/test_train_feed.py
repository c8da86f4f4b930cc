"""How a training worker takes its rows from Ray Data, and the per-step accounting the trainer logs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipelines.train.config import TrainConfig
from pipelines.train.loop import Window, shard_batches, shard_chunk_rows


def _config(batch: int, shuffle: int) -> TrainConfig:
    config = TrainConfig()
    config.data.batch_size = batch
    config.data.shuffle_buffer = shuffle
    return config


def _ids(rows: dict, rng) -> list[int]:
    return [int(i) for i in rows["id"]]


@pytest.fixture(scope="module")
def dataset(ray_local):
    import ray

    # Ray Data hands blocks over in any order unless told to keep it, and these tests compare orders
    options = ray.data.DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True
    yield ray.data.range(100).map_batches(lambda b: {"id": b["id"], "x": b["id"] * 2.0}, batch_format="numpy")
    options.preserve_order = kept


def test_an_epoch_yields_every_row_at_most_once_in_whole_batches(dataset):
    config = _config(batch=8, shuffle=16)
    assert shard_chunk_rows(config) == 32  # at least four micro-batches per chunk
    batches = list(shard_batches(dataset, config, np.random.default_rng(0), _ids))
    assert all(len(b) == 8 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 96  # 100 rows: the last 4 do not fill a batch and are dropped
    assert seen != sorted(seen)  # shuffled within chunks


def test_the_order_follows_the_seed_and_no_shuffle_keeps_file_order(dataset):
    config = _config(batch=8, shuffle=16)
    first = list(shard_batches(dataset, config, np.random.default_rng(1), _ids))
    again = list(shard_batches(dataset, config, np.random.default_rng(1), _ids))
    other = list(shard_batches(dataset, config, np.random.default_rng(2), _ids))
    assert first == again and first != other
    plain = [i for b in shard_batches(dataset, _config(batch=8, shuffle=0), np.random.default_rng(1), _ids) for i in b]
    assert plain == list(range(96))


def test_the_collate_gets_numpy_columns_of_the_picked_rows(dataset):
    def collate(rows, rng):
        assert isinstance(rows["x"], np.ndarray) and rows["x"].shape == (4,)
        np.testing.assert_array_equal(rows["x"], rows["id"] * 2.0)  # columns stay aligned row by row
        return rows

    assert len(list(shard_batches(dataset, _config(batch=4, shuffle=0), np.random.default_rng(0), collate))) == 25


def test_the_window_breakdown_accounts_for_the_elapsed_time():
    import torch

    window = Window(torch.device("cpu"))
    for _ in range(3):
        window.lap()
        time.sleep(0.01)
        window.lap("forward")
        time.sleep(0.002)
        window.add_loss(torch.tensor(2.0))
    window.lap("optimizer")
    timed = window.breakdown(grad_accum=1)
    assert timed["time/forward_ms"] >= 10 and timed["time/optimizer_ms"] > 0
    total = sum(timed.values()) * 3 / 1000
    assert total == pytest.approx(window.elapsed(), rel=0.05)
    assert window.mean_loss() == 2.0


def test_a_pass_of_several_epochs_names_each_copy_and_a_resumed_pass_skips_what_was_trained_on(ray_local):
    import ray

    from pipelines.train.feed import remaining_rows, row_names, with_copies

    rows = ray.data.range(10).map_batches(lambda b: {"id": b["id"], "x": b["id"] * 2.0}, batch_format="numpy")
    whole = with_copies(rows, 3).take_all()
    names = [f"{r['id']}#{r['copy']}" for r in whole]
    assert len(names) == len(set(names)) == 30  # 10 rows x 3 epochs, each named once
    consumed = ["1#0", "2#2", "9#1"]
    rest = remaining_rows(with_copies(rows, 3), consumed).take_all()
    assert sorted(f"{r['id']}#{r['copy']}" for r in rest) == sorted(set(names) - set(consumed))
    assert remaining_rows(rows, ["3#0"]).count() == 9  # a single-epoch pass has no copy column: copy 0
    chunk = {"id": np.array([5, 6, 7]), "copy": np.array([0, 2, 1])}
    assert row_names(chunk, [2, 0]) == ["7#1", "5#0"] and row_names({"id": np.array([4])}, [0]) == ["4#0"]


def test_a_small_split_read_by_the_driver_is_the_split_ray_data_materializes(prepared, monkeypatch):
    """A split kept in the object store is read by the driver itself when it is small (``DRIVER_READ_BYTES``), by
    Ray Data's ``materialize()`` above that: both give the same rows of the task's columns, each epoch's copy once."""
    import json

    import pipelines.train.feed as feed
    from pipelines.train.config import load_config
    from pipelines.train.tasks import make_task
    from tests.pipelines.test_train import CONFIGS

    config = load_config(CONFIGS / "mmface_dit_tiny.yaml", [f"data={prepared}", "data.materialize=always"])
    manifest = json.loads((prepared / "manifest.json").read_text())
    columns = make_task(config, manifest).columns
    monkeypatch.setattr(feed, "MIN_PASS_STEPS", 4)  # a pass of a few epochs, not ~200 steps' worth

    def rows() -> tuple[int, list[tuple[str, int]], set[str]]:
        dataset, repeats = feed.build_dataset(config, manifest, columns)
        taken = dataset.take_all()
        return repeats, sorted((r["id"], r[feed.COPY]) for r in taken), set(taken[0])

    by_driver = rows()
    monkeypatch.setattr(feed, "DRIVER_READ_BYTES", 0)
    by_ray_data = rows()
    repeats, names, keys = by_driver
    assert repeats > 1 and len(names) == len(set(names)) == repeats * manifest["counts"]["splits"]["train"]["n_written"]
    assert by_driver == by_ray_data and keys == {*columns, feed.COPY}
