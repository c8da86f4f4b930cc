"""Elastic workers (``scaling.num_workers: [min, max]``): the config's forms and refusals, and a short run through
Ray Train's elastic scaling policy whose steps each take the configured global batch at the world size it got.
Losing and regaining a node is in ``tests/test_nodes.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.train.config import config_from_dict, load_config
from pipelines.train.loop import deepspeed_config
from pipelines.train.run import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_num_workers_is_an_int_or_a_min_max_range_in_yaml_and_on_the_command_line(tmp_path):
    fixed = load_config(CONFIGS / "mmface_dit_tiny.yaml", ["workers=2"])
    assert (fixed.scaling.elastic, fixed.scaling.min_workers, fixed.scaling.max_workers) == (False, 2, 2)
    for overrides in (["workers=[1,2]"], ["scaling.num_workers=[1, 2]"], ["num_workers=[1,2]"]):
        config = load_config(CONFIGS / "mmface_dit_tiny.yaml", overrides)
        assert config.scaling.num_workers == [1, 2] and config.scaling.elastic
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump({"scaling": {"num_workers": [1, 4]}, "data": {"batch_size": 2, "grad_accum": 3}}))
    config = load_config(path)
    # the global batch is the configured one (at max workers); each world size accumulates what it lacks
    assert config.global_batch == 2 * 3 * 4
    assert {w: config.grad_accum_at(w) for w in range(1, 5)} == {1: 12, 2: 6, 3: 4, 4: 3}
    assert deepspeed_config(config, 3)["gradient_accumulation_steps"] == 4
    assert deepspeed_config(config)["gradient_accumulation_steps"] == 3  # max workers: the configured grad_accum
    # the workers rebuild the config from its dict: the range survives the trip
    assert config_from_dict(config.to_dict()).scaling.num_workers == [1, 4]
    assert load_config(None, ["workers=[2,2]"]).scaling.num_workers == 2  # a range of one is fixed


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["workers=[0,2]"], ["scaling.num_workers=[0, 2]", "1 <= min <= max"]),
        (["workers=[3,2]"], ["scaling.num_workers=[3, 2]", "1 <= min <= max"]),
        (["workers=[1,2.5]"], ["scaling.num_workers=", "two ints"]),
        (["workers=[1,2,3]"], ["scaling.num_workers=", "two ints"]),
        (["workers=many"], ["scaling.num_workers=", "[min, max]"]),
        (["workers=[1,2]", "zero_stage=3"], ["scaling.num_workers=[1, 2]", "zero_stage=3", "fixed num_workers"]),
        # 8 x 1 x 3 = 24 samples per step: 2 workers would need 1.5 micro-batches of 8 each
        (["workers=[1,3]", "batch=8"], ["global batch 24", "at 2 worker(s)", "data.grad_accum", "multiple of 2"]),
        (["workers=[2,5]", "batch=1"], ["global batch 5", "2, 3, 4 worker(s)", "multiple of 12"]),
    ],
)
def test_a_bad_range_is_refused_naming_the_key_and_the_fix(overrides, words):
    with pytest.raises(ValueError) as error:
        load_config(CONFIGS / "mmface_dit_tiny.yaml", overrides)
    problem = str(error.value).splitlines()[-1]  # one line names it (after "invalid training config:")
    assert all(word in problem for word in words), problem


def test_the_suggested_grad_accum_fixes_the_range():
    config = load_config(None, ["workers=[2,5]", "batch=1", "grad_accum=12"])
    assert [config.grad_accum_at(w) for w in range(2, 6)] == [30, 20, 15, 12]


def _metric(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow  # ~70 s on the 2-core machine, most of it the worker group's start; the config tests above stay fast
def test_an_elastic_run_takes_the_configured_global_batch_at_the_world_size_it_got(
    prepared, tmp_path, monkeypatch, capsys
):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # 2 micro-batches of 4 per worker at max (2 workers): 16 samples a step, whatever the world size
    overrides = [f"data={prepared}", f"storage={tmp_path / 'runs'}", "name=elastic", "log_every=1", "sample_every=0",
                 "workers=[1,2]", "batch=4", "grad_accum=2", "max_steps=3", "ckpt_every=3", "data.materialize=never",
                 "ema=false"]  # fmt: skip
    config = load_config(CONFIGS / "mmface_dit_tiny.yaml", overrides)
    summary = train(config)
    client = MlflowClient(uri)
    run_id = summary["mlflow_run_id"]
    world, accum = _metric(client, run_id, "train/world_size"), _metric(client, run_id, "train/grad_accum")
    samples = _metric(client, run_id, "train/samples_per_s")
    assert sorted(world) == sorted(accum) == sorted(samples) == [1, 2, 3]  # every step once
    assert set(world.values()) <= {1.0, 2.0}
    assert all(accum[s] * 4 * world[s] == 16 for s in world), (world, accum)
    assert client.get_run(run_id).data.params["scaling.num_workers"] == "[1, 2]"
    # the rows the run consumed: 3 steps x 16 (the checkpoint's record of the pass, from every rank)
    from pipelines.train.feed import DATA_POSITION

    consumed = json.loads((Path(summary["checkpoint"]) / DATA_POSITION).read_text())["consumed"]
    assert len(consumed) == len(set(consumed)) == 3 * 16
    print(f"\nelastic [1, 2] on this machine: world size {sorted(set(world.values()))}, grad_accum {accum}")
