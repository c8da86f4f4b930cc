"""The trainer end to end on CPU: 2 Ray Train workers, DeepSpeed, bitsandbytes AdamW8bit, EMA, MLflow.

Real Ray, real DeepSpeed, real MLflow on SQLite; tiny models on the synthetic faces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.train.config import load_config
from pipelines.train.loop import DEEPSPEED_DIR, STATE_FILE, WEIGHTS_DIR
from pipelines.train.run import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _history(uri: str, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _state(checkpoint: str) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _train_ids(prepared: Path) -> set[str]:
    import pyarrow.parquet as pq

    manifest = json.loads((prepared / "manifest.json").read_text())
    files = [prepared / "shards" / s["file"] for s in manifest["shards"] if s["split"] == "train"]
    return {str(i) for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


def _config(prepared: Path, tmp_path: Path, *overrides: str, name: str = "tiny"):
    return load_config(
        CONFIGS / "mmface_dit_tiny.yaml",
        [f"data={prepared}", f"storage={tmp_path / 'runs'}", f"name={name}", "log_every=1", *overrides],
    )


def test_zero2_adamw8bit_trains_resumes_by_name_and_checkpoints_serve(prepared, tmp_path, mlflow_uri):
    first = train(_config(prepared, tmp_path, "max_steps=8", "ckpt_every=4", "lr=1e-3", "train.warmup_steps=2"))
    assert _state(first["checkpoint"])["step"] == 8
    # the same run name continues from the last checkpoint, in the same MLflow run
    second = train(_config(prepared, tmp_path, "max_steps=30", "ckpt_every=10", "lr=1e-3", "train.warmup_steps=2"))
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert _state(second["checkpoint"])["step"] == 30
    history = _history(mlflow_uri, second["mlflow_run_id"])
    assert [step for step, _ in history] == list(range(1, 31))  # each step once, none missing
    losses = [value for _, value in history]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])  # loss falls (flow loss has a high floor)

    # the serving weights load strictly and equal the EMA the trainer kept
    from modeling.mmface_dit import MMFaceDiTConfig, build
    from modeling.weights import load_into, load_weights

    state, config = load_weights(Path(second["checkpoint"]) / WEIGHTS_DIR, ema=True)
    assert config["arch"] == "mmface-dit" and config["codec"]["name"] == "pixel:2"
    model = build(MMFaceDiTConfig.from_dict(config["model"]))
    load_into(model, state)
    inputs = dict(
        x=torch.randn(2, 12, 16, 16),
        cond=torch.randn(2, 12, 16, 16),
        timestep=torch.tensor([10.0, 500.0]),
        text=torch.randn(2, 5, 384),
        pooled=torch.randn(2, 384),
        modality=torch.tensor([0, 1]),
    )
    out = model.eval()(**inputs)
    assert out.abs().sum() > 0  # trained: no longer the zero-initialised output
    # the served weights are the EMA, not the optimizer's (test_the_saved_ema_... checks the EMA's values)
    raw, _ = load_weights(Path(second["checkpoint"]) / WEIGHTS_DIR, ema=False)
    assert set(raw) == set(state) and any(not torch.equal(raw[k], state[k]) for k in state)

    # publish: a registered pyfunc version that generates the same image for the same seed
    import mlflow
    import pandas as pd

    from pipelines.train.publish import publish

    published = publish("tiny", storage=str(tmp_path / "runs"))
    assert published["registered_model"] == "faceforge-mmface-dit" and published["version"] == 1
    mlflow.set_tracking_uri(mlflow_uri)
    pyfunc = mlflow.pyfunc.load_model(published["model_uri"])
    frame = pd.DataFrame({"prompt": ["a woman with red hair"] * 2, "seed": [7, 7], "steps": [4, 4]})
    images = pyfunc.predict(frame)["image_png"]
    assert len(images) == 2 and images[0] == images[1]

    # a weights folder that no run trained (what `faceforge import` writes) publishes into the "imported"
    # experiment, and serves the same images as the checkpoint it was copied from
    imported = tmp_path / "released" / WEIGHTS_DIR
    shutil.copytree(Path(second["checkpoint"]) / WEIGHTS_DIR, imported)
    from_folder = publish(str(imported.parent))
    assert from_folder["version"] == 2 and from_folder["checkpoint"] == str(imported.resolve())
    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version("faceforge-mmface-dit", "2")
    assert version.tags["step"] == "imported"
    assert client.get_experiment(client.get_run(version.run_id).info.experiment_id).name == "imported"
    again = mlflow.pyfunc.load_model(from_folder["model_uri"]).predict(frame)["image_png"]
    assert again[0] == images[0]


def test_the_saved_ema_is_the_average_of_the_weights_history_across_a_resume(prepared, tmp_path, mlflow_uri):
    """With a checkpoint every step the raw weights of every step are kept: the EMA saved beside each one must be
    what the update rule gives from the initial weights through that history (decay min(d, (1 + n) / (10 + n))),
    across a resume (the shadow and its update count come back from the checkpoint)."""
    from modeling.checkpoints import checkpoint_name
    from modeling.weights import load_weights
    from pipelines.data.prepare import load_manifest
    from pipelines.train.tasks import make_task

    overrides = ("ckpt_every=1", "keep=10", "workers=1", "sample_every=0", "lr=1e-3", "train.warmup_steps=1")
    train(_config(prepared, tmp_path, "max_steps=2", *overrides, name="ema"))
    config = _config(prepared, tmp_path, "max_steps=4", *overrides, name="ema")
    train(config)
    assert config.ema.enabled and config.ema.warmup
    torch.manual_seed(config.run.seed)  # the trainer's initial weights: the same seed, the same builder
    model = make_task(config, load_manifest(prepared)).build_model("cpu")
    expected = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    previous = expected
    for n in range(4):
        folder = tmp_path / "runs" / "ema" / checkpoint_name(n + 1) / WEIGHTS_DIR
        raw, _ = load_weights(folder, ema=False)
        saved, _ = load_weights(folder, ema=True)
        assert set(raw) == set(saved) == set(expected)
        assert any(not torch.equal(raw[k], previous[k]) for k in raw)  # the weights moved: the average has work
        decay = min(config.ema.decay, (1 + n) / (10 + n))
        expected = {k: decay * v + (1 - decay) * raw[k] for k, v in expected.items()}
        for k in expected:
            torch.testing.assert_close(saved[k], expected[k], rtol=1e-5, atol=1e-6, msg=f"step {n + 1}: {k}")
        previous = raw


@pytest.fixture
def same_batches(monkeypatch):
    """Ray Data hands blocks over in a fixed order (by default whichever is ready first), so two one-worker runs
    with the same seed see the same batches at the same steps: their loss curves can be compared step by step."""
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", True)


def _same_curve(uri: str, ours: dict, reference: dict, rtol: float) -> list[float]:
    """Per-step losses of two runs agree within ``rtol``; returns the reference curve."""
    a, b = _history(uri, ours["mlflow_run_id"]), _history(uri, reference["mlflow_run_id"])
    assert [s for s, _ in a] == [s for s, _ in b]
    worst = max(abs(x - y) / y for (_, x), (_, y) in zip(a, b))
    assert worst < rtol, (worst, a, b)
    return [v for _, v in b]


# one worker, a learning rate at which the tiny model's loss moves within a few steps
COMPARED = ("workers=1", "sample_every=0", "lr=3e-3", "train.warmup_steps=1")


@pytest.mark.slow  # the first compiled step takes minutes on a loaded 2-core machine
def test_compiled_run_follows_the_eager_loss_curve_and_resumes_in_an_eager_run(
    prepared, tmp_path, mlflow_uri, same_batches
):
    # torch.compile works in place, so checkpoint and EMA parameter names are those of the eager model
    overrides = ("max_steps=4", "ckpt_every=2", "ema=false", *COMPARED)
    compiled = train(_config(prepared, tmp_path, "compile=true", *overrides, name="compiled"))
    eager = train(_config(prepared, tmp_path, *overrides, name="eager"))
    _same_curve(mlflow_uri, compiled, eager, rtol=0.01)
    resumed = train(_config(prepared, tmp_path, *overrides[1:], "max_steps=6", name="compiled"))
    assert resumed["mlflow_run_id"] == compiled["mlflow_run_id"]
    assert _state(resumed["checkpoint"])["step"] == 6


@pytest.mark.slow  # two training runs
def test_zero3_follows_the_zero2_loss_curve_and_keeps_its_ema(prepared, tmp_path, mlflow_uri, same_batches):
    # ZeRO-3 partitions the parameters (gathered for the EMA and the saved weights); it must learn as ZeRO-2 does.
    # It also streams the shards every epoch instead of keeping them in the object store (the default here).
    overrides = ("max_steps=6", "ckpt_every=6", *COMPARED)
    zero2 = train(_config(prepared, tmp_path, *overrides, name="z2"))
    zero3 = train(_config(prepared, tmp_path, *overrides, "zero_stage=3", name="z3"))
    losses = _same_curve(mlflow_uri, zero3, zero2, rtol=0.02)
    assert _state(zero3["checkpoint"])["step"] == 6
    from modeling.weights import load_weights

    ema2, _ = load_weights(Path(zero2["checkpoint"]) / WEIGHTS_DIR, ema=True)
    ema3, _ = load_weights(Path(zero3["checkpoint"]) / WEIGHTS_DIR, ema=True)
    assert set(ema3) == set(ema2) and all(ema3[k].shape == ema2[k].shape for k in ema2)  # whole tensors
    print(f"\nZeRO-2 losses {losses}")


def test_killed_worker_resumes_within_its_pass_and_mlflow_has_each_step_once(prepared, tmp_path, mlflow_uri):
    # 65 training rows, 2 workers x 4 per step, read from the shards (not kept in Ray's object store): Ray's
    # equal split gives each worker 32 rows, so a pass is one epoch of 8 steps and drops one row
    summary = train(
        _config(
            prepared,
            tmp_path,
            "max_steps=10",
            "ckpt_every=4",
            "keep=3",
            "batch=4",
            "data.materialize=never",
            "fault.kill_rank=1",
            "fault.kill_at_step=6",
            name="crash",
        )
    )
    run = tmp_path / "runs" / "crash"
    assert (run / ".fault_injected").is_file()  # the worker really died
    assert _state(summary["checkpoint"])["step"] == 10
    assert [step for step, _ in _history(mlflow_uri, summary["mlflow_run_id"])] == list(range(1, 11))
    # the restart is in MLflow: why, from which checkpoint, on how many workers
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    assert client.get_run(summary["mlflow_run_id"]).data.tags["faceforge.restarts"] == "1"
    restart = json.loads(Path(client.download_artifacts(summary["mlflow_run_id"], "restarts/001.json")).read_text())
    assert restart["why"].startswith("rank 1: worker died") and restart["from_checkpoint"] == "checkpoint_000004"
    assert (restart["step"], restart["workers"]) == (4, 2)
    assert {v for _, v in _history(mlflow_uri, summary["mlflow_run_id"], "train/world_size")} == {2}

    from pipelines.train.feed import DATA_POSITION

    def position(step: int) -> tuple[int, list[str]]:
        data = json.loads((run / f"checkpoint_{step:06d}" / DATA_POSITION).read_text())
        return data["pass"], data["consumed"]

    # resumed from step 4 (32 rows in), the run read only the 33 rows its pass had left: at the end of the pass
    # (step 8) every row it trained on is there once, as in an uninterrupted pass, the odd row excepted
    before, (pass_at_8, epoch) = position(4)[1], position(8)
    assert position(4)[0] == pass_at_8 == 0 and len(before) == 32 and set(before) <= set(epoch)
    assert len(epoch) == len(set(epoch)) == 64 and {name.split("#")[0] for name in epoch} <= _train_ids(prepared)
    pass_at_10, started = position(10)
    assert pass_at_10 == 1 and len(started) == len(set(started)) == 16  # the next pass is whole again


def test_a_damaged_newest_checkpoint_is_passed_over_by_publish_and_resume(prepared, tmp_path, mlflow_uri, capsys):
    from modeling.checkpoints import DamagedCheckpoint, newest_complete
    from pipelines.train.publish import publish
    from pipelines.train.run import RAY_SNAPSHOT

    overrides = ("ckpt_every=2", "keep=2", "workers=1", "sample_every=0", "ema=false")
    train(_config(prepared, tmp_path, "max_steps=4", *overrides, name="damaged"))
    run_dir = tmp_path / "runs" / "damaged"
    folders = lambda: sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())  # noqa: E731
    assert folders() == ["checkpoint_000002", "checkpoint_000004"]
    newest = run_dir / "checkpoint_000004"
    optimizer_state = next(newest.rglob("*optim_states.pt"))
    optimizer_state.write_bytes(optimizer_state.read_bytes()[:1000])  # a copy cut short
    name = optimizer_state.relative_to(newest).as_posix()

    with pytest.raises(DamagedCheckpoint, match=f"checkpoint_000004: {name} is 1000 bytes, the manifest says"):
        publish("damaged", storage=str(tmp_path / "runs"), checkpoint=str(newest))
    published = publish("damaged", storage=str(tmp_path / "runs"))
    assert published["checkpoint"] == str((run_dir / "checkpoint_000002").resolve())

    (run_dir / RAY_SNAPSHOT).write_text("")  # what a full disk left of Ray's checkpoint list
    capsys.readouterr()
    summary = train(_config(prepared, tmp_path, "max_steps=6", *overrides, name="damaged"))
    err = capsys.readouterr().err
    assert f"skipped checkpoint_000004: {name} is 1000 bytes" in err and "using checkpoint_000002" in err
    assert "is empty (0 bytes)" in err
    assert _state(summary["checkpoint"])["step"] == 6
    # steps 3-4 trained again into a fresh checkpoint_000004; rotation kept exactly two
    assert folders() == ["checkpoint_000004", "checkpoint_000006"]
    assert newest_complete(run_dir, deep=True) == run_dir / "checkpoint_000006"
    assert newest_complete(run_dir / "missing") is None


def _staged(run_dir: Path, step: int) -> tuple[Path, list[dict]]:
    """A checkpoint whose every rank's files are in the run folder, before rank 0 finishes it."""
    from modeling.checkpoints import checkpoint_name, file_records, rank_marker

    path = run_dir / checkpoint_name(step)
    (path / "deepspeed" / "state").mkdir(parents=True)
    (path / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(bytes(2048))
    (path / WEIGHTS_DIR).mkdir()
    (path / WEIGHTS_DIR / "model.safetensors").write_bytes(bytes(1024))
    (path / rank_marker(0)).touch()
    (path / STATE_FILE).write_text(json.dumps({"step": step, "epoch": 1, "ema_updates": 0, "world": 1, "manifest": 1}))
    return path, file_records(path)


def test_a_full_disk_names_the_folder_and_leaves_the_previous_checkpoint_in_charge(tmp_path, monkeypatch):
    import errno

    import modeling.storage
    from modeling.checkpoints import MANIFEST_FILE, NoSpaceLeft, newest_complete
    from pipelines.train.loop import finish_checkpoint

    previous = _staged(tmp_path, 4)
    finish_checkpoint(*previous, keep=1)
    path, records = _staged(tmp_path, 8)

    def disk_full(target, text):
        target.local_path.with_name(".partial").write_text(text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:  # the manifest's write, through the storage layer, meets a full disk
        patch.setattr(modeling.storage, "write_text", disk_full)
        with pytest.raises(NoSpaceLeft) as error:
            finish_checkpoint(path, records, keep=1)
    assert str(error.value).endswith(f"no space left on {path}") and "\n" not in str(error.value)
    assert not (path / MANIFEST_FILE).exists()
    assert newest_complete(tmp_path) == previous[0]  # not rotated away, and what a resume uses

    finish_checkpoint(path, records, keep=1)  # space freed: the retried save completes and rotation follows
    assert newest_complete(tmp_path) == path and not previous[0].exists()


def test_a_full_disk_reported_by_the_copy_into_storage_is_named_too(tmp_path):
    from modeling.checkpoints import NoSpaceLeft, no_space_left

    # pyarrow's local copy says it in words, without an errno
    with pytest.raises(NoSpaceLeft, match=f"no space left on {tmp_path}"):
        with no_space_left(tmp_path):
            raise OSError("IOError: Failed to write to file: No space left on device")
    with pytest.raises(PermissionError):
        with no_space_left(tmp_path):
            raise PermissionError("read-only")


def test_an_empty_or_stale_ray_checkpoint_list_is_set_aside_for_the_run_folder(tmp_path, capsys):
    from pipelines.train.loop import finish_checkpoint
    from pipelines.train.run import RAY_SNAPSHOT, set_aside_unusable_ray_snapshot

    checkpoint, records = _staged(tmp_path, 4)
    finish_checkpoint(checkpoint, records, keep=2)
    snapshot = tmp_path / RAY_SNAPSHOT
    snapshot.write_text("")  # what a full disk left of it
    aside = set_aside_unusable_ray_snapshot(tmp_path, checkpoint)
    assert not snapshot.exists() and aside.read_text() == ""
    err = capsys.readouterr().err
    assert f"{snapshot} is empty (0 bytes)" in err and "resuming from checkpoint_000004" in err

    snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_000004", "metrics": {}}]')
    assert (
        set_aside_unusable_ray_snapshot(tmp_path, checkpoint) is not None
        and "not valid JSON" in capsys.readouterr().err
    )

    listed = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_000004", "metrics": {}}]}
    snapshot.write_text(json.dumps(listed))
    assert set_aside_unusable_ray_snapshot(tmp_path, checkpoint) is None and snapshot.exists()  # a sound list stays
    listed["latest_checkpoint_result"] = {"checkpoint_dir_name": "checkpoint_000002", "metrics": {}}
    snapshot.write_text(json.dumps(listed))
    assert set_aside_unusable_ray_snapshot(tmp_path, checkpoint) is not None
    assert "names checkpoint_000002, no longer in the run folder" in capsys.readouterr().err


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="train.zero_stage=5"):
        load_config(CONFIGS / "mmface_dit_tiny.yaml", ["zero_stage=5"])
    with pytest.raises(ValueError, match="unknown key 'train.nope'"):
        load_config(CONFIGS / "mmface_dit_tiny.yaml", ["train.nope=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(CONFIGS / "mmface_dit_tiny.yaml", ["max_steps"])
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "missing.yaml")
    config = load_config(CONFIGS / "mmface_dit_tiny.yaml", ["data=/x", "max_steps=7", "gpu=false", "lr=2e-4"])
    assert (config.data.path, config.train.max_steps, config.scaling.use_gpu, config.train.lr) == ("/x", 7, False, 2e-4)


def test_face_mogle_two_stages_through_the_same_entrypoint(prepared, tmp_path, mlflow_uri):
    """Tiny FLUX base in full mode, then the paper's LoRA + MoGLE stage on top of it."""
    runs = tmp_path / "runs"
    common = [f"data={prepared}", f"storage={runs}", "log_every=1", "lr=2e-3", "train.warmup_steps=2"]
    base = train(load_config(CONFIGS / "flux_base_tiny.yaml", [*common, "max_steps=24", "ckpt_every=24"]))
    losses = [v for _, v in _history(mlflow_uri, base["mlflow_run_id"])]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.9 * sum(losses[:4])

    stage = [*common, "ckpt_every=6", f"base_from={runs / 'flux-base-tiny'}"]
    lora = train(load_config(CONFIGS / "face_mogle_tiny.yaml", [*stage, "max_steps=6"]))
    assert _state(lora["checkpoint"])["step"] == 6
    # the training checkpoint leaves the frozen base out too (base_from rebuilds it) ...
    (model_states,) = (Path(lora["checkpoint"]) / DEEPSPEED_DIR).rglob("*model_states.pt")
    saved = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    assert saved and all(".lora_" in k or k.startswith("mogle.") for k in saved)
    # ... and the run resumes from it: same run, two more steps, the trainable tensors carried on
    resumed = train(load_config(CONFIGS / "face_mogle_tiny.yaml", [*stage, "max_steps=8", "ckpt_every=2"]))
    assert resumed["mlflow_run_id"] == lora["mlflow_run_id"] and _state(resumed["checkpoint"])["step"] == 8
    losses = [s for s, _ in _history(mlflow_uri, lora["mlflow_run_id"])]
    assert sorted(losses) == list(range(1, 9))

    from modeling.face_mogle import build_face_mogle, load_trainable
    from modeling.weights import load_weights

    state, config = load_weights(Path(lora["checkpoint"]) / WEIGHTS_DIR, ema=True)
    assert config["arch"] == "face-mogle" and config["model"]["mode"] == "lora"
    # only the condition LoRA and MoGLE are saved, never the frozen base
    assert state and all(".lora_" in k or k.startswith("mogle.") for k in state)
    from modeling.face_mogle import FaceMoGLEConfig

    model = build_face_mogle(FaceMoGLEConfig.from_dict(config["model"]), config["base_from"])
    load_trainable(model, state)  # strict: every trainable tensor present, nothing unexpected


def test_flux_dev_recipe_states_its_ema_choice_and_prodigy_runs_as_the_official_code():
    from pipelines.train.loop import make_optimizer

    config = load_config(CONFIGS / "face_mogle_flux_dev.yaml", ["optimizer=prodigy", "lr=1.0"])
    assert config.ema.enabled is False  # the official recipe keeps no EMA
    # stepped on a least-squares fit: Prodigy grows its step size d from d0 on its own, and the loss falls
    g = torch.Generator().manual_seed(0)
    inputs, truth = torch.randn(64, 8, generator=g), torch.randn(8, 1, generator=g)
    weight = torch.nn.Parameter(torch.zeros(8, 1))
    optimizer = make_optimizer(config, [weight])
    assert type(optimizer).__name__ == "Prodigy"
    assert optimizer.defaults["use_bias_correction"] and optimizer.defaults["safeguard_warmup"]
    losses = []
    for _ in range(200):
        loss = (inputs @ weight - inputs @ truth).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    group = optimizer.param_groups[0]
    assert group["d"] > 100 * group["d0"], group["d"]
    assert losses[-1] < 0.01 * losses[0], losses[::20]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _swap_first_shard_for_last(data: Path) -> None:
    shards = [s["file"] for s in json.loads((data / "manifest.json").read_text())["shards"] if s["split"] == "train"]
    shutil.copyfile(data / "shards" / shards[-1], data / "shards" / shards[0])


DAMAGES = {
    "truncated shard": (lambda data: _truncate(data / "shards" / "train-00000.parquet"), "train-00000.parquet"),
    "garbled shard": (lambda data: _garble(data / "shards" / "train-00001.parquet"), "train-00001.parquet"),
    "shard missing": (lambda data: (data / "shards" / "train-00001.parquet").unlink(), "train-00001.parquet"),
    "shard rows differ": (_swap_first_shard_for_last, "train-00000.parquet"),
    "manifest not JSON": (lambda data: _truncate(data / "manifest.json"), "manifest.json"),
    "manifest not an object": (lambda data: (data / "manifest.json").write_text("[]"), "manifest.json"),
    "null text missing": (lambda data: (data / "null_text.safetensors").unlink(), "null_text.safetensors"),
    "null text garbled": (lambda data: _garble(data / "null_text.safetensors"), "null_text.safetensors"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_prepared_data_is_refused_in_one_line_before_training(prepared, tmp_path, mlflow_uri, capsys, damage):
    from mlflow import MlflowClient

    from pipelines.cli import main

    data = tmp_path / "prepared"
    shutil.copytree(prepared, data)
    apply, file_name = DAMAGES[damage]
    apply(data)
    overrides = [f"data={data}", f"storage={tmp_path / 'runs'}", "max_steps=1", "workers=1", "scaling.max_failures=0"]
    assert main(["train", str(CONFIGS / "mmface_dit_tiny.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("faceforge: error: ")]
    assert len(errors) == 1, err
    assert file_name in errors[0] and "faceforge data prepare" in errors[0], errors[0]
    assert not (tmp_path / "runs").exists()  # refused before any worker (or checkpoint folder) started
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(run.info.status != "RUNNING" for run in runs)


def test_a_restart_names_its_cause_before_the_ranks_that_only_lost_a_peer():
    from ray.exceptions import ActorDiedError

    from pipelines.train.restarts import describe

    echo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:41187: Connection reset by peer")
    node = RuntimeError("The actor died because its node has died. Node Id: 5a1f")
    assert describe({0: echo, 1: ActorDiedError()}).startswith("rank 1: worker died (ActorDiedError")
    assert describe({0: echo, 1: node}).startswith("rank 1: node lost")
    assert describe({0: ValueError("bad batch")}) == "rank 0: worker raised (ValueError: bad batch)"


def test_steps_a_checkpoint_covers_reach_mlflow_once_even_when_rank_0_died_before_its_flush(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from pipelines.train.loop import MetricBuffer

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("recover")).info.run_id
    history = lambda: sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))  # noqa: E731
    first = tmp_path / "checkpoint_000002"
    first.mkdir()
    dying = MetricBuffer(mlflow_uri, run_id)
    dying.add(1, {"train/loss": 1.5, "train/lr": 0.1})
    dying.add(2, {"train/loss": 1.4, "train/lr": 0.1})
    dying.save(first)  # the checkpoint is complete; rank 0 dies before its flush
    assert history() == []
    resumed = MetricBuffer(mlflow_uri, run_id)
    resumed.recover(first)
    resumed.recover(first)  # a second resume from the same checkpoint logs nothing more
    assert history() == [1, 2]
    second = tmp_path / "checkpoint_000004"
    second.mkdir()
    resumed.add(3, {"train/loss": 1.3, "train/lr": 0.1})
    resumed.add(4, {"train/loss": 1.2, "train/lr": 0.1})
    resumed.save(second)
    resumed.flush()  # this time the flush happened: a resume from it has nothing to add
    MetricBuffer(mlflow_uri, run_id).recover(second)
    assert history() == [1, 2, 3, 4] and len(client.get_metric_history(run_id, "train/lr")) == 4
