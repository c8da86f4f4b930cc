"""``faceforge train CONFIG [key=value ...]``: the driver that builds the ``TorchTrainer``.

The driver validates the config against the prepared dataset, opens (or re-opens) the MLflow run, reads
the shards with Ray Data and starts the workers. Re-running with the same ``run.name`` and
``run.storage`` resumes from the last checkpoint (Ray Train V2) and continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from modeling import storage
from modeling.checkpoints import STATE_FILE, checkpoint_step, newest_complete, resolve_checkpoint
from modeling.storage import Location, Where
from pipelines.train.config import TrainConfig, dump_config, load_config
from serve.settings import check_tracking_server, tracking_uri

RUN_TAG = "faceforge.run_name"
# Ray Train V2's list of the checkpoints it registered, kept in the run folder and read back on a resume
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# How often Ray Train's controller polls its workers (Ray's default 2 s). It is also how soon the controller sees
# that the workers finished or one failed: measured on 2 cores, the workers' last step to ``fit()`` returning took
# 3.5-5 s at 2 s and 0.7-0.9 s at 0.25 s, a cost every run and every restart pays. A value in the environment wins;
# Ray Train hands the driver's value to its controller, on a cluster too.
HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside its database file (MLflow's default, ``./mlruns`` of whatever
    folder a process happens to run in, would scatter them); a tracking server chooses its own (proxied with
    ``mlflow server --serve-artifacts``: no client ever writes to a path of its own disk)."""
    database = storage.sqlite_database(uri)
    return (database.parent / "artifacts").as_uri() if database else None


def mlflow_run_of(run_dir: Where, uri: str | None = None) -> str:
    """The MLflow run id of the training run that writes into ``run_dir`` (found by its run-folder tag)."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    client = MlflowClient(uri)
    run_dir = storage.location(run_dir)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`faceforge.run_dir` = '{run_dir}'",
        max_results=1,
    )
    if not runs:
        raise FileNotFoundError(
            f"no MLflow run for {run_dir.name} (trained into {run_dir}) at {uri}; is MLFLOW_TRACKING_URI the same?"
        )
    return runs[0].info.run_id


def experiment_name(config: TrainConfig, manifest: dict) -> str:
    if config.run.experiment:
        return config.run.experiment
    dataset = Path(manifest.get("root", config.data.path)).name or "dataset"
    return f"{dataset}/{config.model.arch}"


def create_tracking_store(uri: str) -> None:
    """Create a fresh SQLite tracking store under a file lock: two jobs starting together on one machine would
    otherwise both run MLflow's schema migration and one of them fail ("table ... already exists")."""
    import fcntl

    from mlflow import MlflowClient

    db = storage.sqlite_database(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # creates or upgrades the schema
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_mlflow_run(config: TrainConfig, manifest: dict, run_dir: Where) -> tuple[str, str, bool]:
    """The run's MLflow id: found by name tag + storage folder, or created with params and artifacts."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    create_tracking_store(uri)
    client = MlflowClient(uri)
    name = experiment_name(config, manifest)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifact_location(uri))
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = '{config.run.name}' and tags.`faceforge.run_dir` = '{run_dir}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return uri, run_id, True
    run = client.create_run(
        experiment_id,
        run_name=config.run.name,
        tags={RUN_TAG: config.run.name, "faceforge.run_dir": str(run_dir), "faceforge.arch": config.model.arch},
    )
    run_id = run.info.run_id
    params = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for k, v in config.flat().items()}
    counts = manifest["counts"]
    params.update(
        {
            "dataset.layout": manifest["layout"],
            "dataset.root": manifest["root"],
            "dataset.size": manifest["size"],
            "dataset.codec": manifest["codec"]["name"],
            "dataset.text_encoder": manifest["text_encoder"]["name"],
            "dataset.n_written": counts["n_written"],
            "dataset.n_rejected": counts["n_rejected"],
            "dataset.n_train": counts["splits"].get(config.data.split, {}).get("n_written", 0),
        }
    )
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 90):
        client.log_batch(run_id, params=items[start : start + 90])
    client.log_text(run_id, dump_config(config), "config.json")
    client.log_text(run_id, json.dumps(manifest, indent=2), "dataset_manifest.json")
    return uri, run_id, False


def build_trainer(config: TrainConfig, manifest: dict, loop_extra: dict, mark: Callable[[str], object] | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.feed import build_dataset
    from pipelines.train.loop import train_loop_per_worker
    from pipelines.train.restarts import FailureNote
    from pipelines.train.tasks import make_task

    task = make_task(config, manifest)
    dataset, repeats = build_dataset(config, manifest, task.columns)
    if mark:
        mark("dataset")
    loop_extra = {**loop_extra, "epochs_per_pass": repeats}
    s = config.scaling
    runs = storage.location(config.run.storage)
    notes = [FailureNote(loop_extra["run_dir"], loop_extra.get("storage_env"))] if "run_dir" in loop_extra else None
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "manifest": manifest, **loop_extra},
        # [min, max]: Ray Train's elastic policy starts (and after a failure restarts) with as many workers as
        # can be placed, at least min, and grows a running group back towards max every resize_check_s
        scaling_config=ScalingConfig(
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=s.resize_check_s,
        ),
        run_config=RunConfig(
            name=config.run.name,
            # an object store: Ray Train takes the bucket path without its scheme, plus the filesystem
            storage_path=runs.path,
            storage_filesystem=None if runs.is_local else runs.fs,
            failure_config=FailureConfig(max_failures=s.max_failures),
            # rank 0 rotates (checkpoint.keep) once a checkpoint's manifest is written: Ray would count
            # checkpoints by its reports alone, even one that never became complete
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            # notes why workers failed, for the next worker group to say and record (pipelines.train.restarts)
            callbacks=notes,
        ),
        datasets={"train": dataset},
    )


def leave_cpu_headroom(config: TrainConfig) -> None:
    """Ray Data needs CPUs while the workers train; with too few it starves and the run hangs."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    workers = config.scaling.max_workers
    wanted = workers * config.scaling.cpus_per_worker
    if wanted > total - 1:
        shrunk = max(0.1, (total - 1) / workers)
        print(
            f"[faceforge] {workers} workers x {config.scaling.cpus_per_worker} CPU would leave "
            f"Ray Data no CPU of {total:g}; using {shrunk:.2f} CPU per worker (scaling.cpus_per_worker)",
            file=sys.stderr,
        )
        config.scaling.cpus_per_worker = shrunk


def check_prepared_data(config: TrainConfig) -> dict:
    """The driver's pre-flight, before Ray, MLflow or any worker: the manifest parses, the null conditions load
    and every shard of the split has a readable footer with the manifest's row count and the task's columns.
    A damaged file is a ``ValueError`` (or ``FileNotFoundError``) naming it and the fix; returns the manifest."""
    from pipelines.data.prepare import load_manifest, verify_prepared
    from pipelines.train.task import NullText
    from pipelines.train.tasks import make_task

    manifest = load_manifest(config.data.path)
    NullText.load(config.data.path)
    verify_prepared(config.data.path, manifest, config.data.split, make_task(config, manifest).columns)
    return manifest


def shards_to_verify(config: TrainConfig, manifest: dict) -> list[dict]:
    """Which shards' checksums the driver checks before the workers start (``data.verify``): the one the sample
    grids read, and the training split when it is small enough to read once (``data.verify_gb``)."""
    d = config.data
    if d.verify == "never":
        return []
    by_split = {}
    for shard in manifest["shards"]:
        by_split.setdefault(shard["split"], []).append(shard)
    grid = (by_split.get(d.holdout_split) or by_split.get(d.split) or [])[:1]
    train = by_split.get(d.split, [])
    if d.verify == "always" or sum(s.get("bytes", 0) for s in train) <= d.verify_gb * 2**30:
        return grid + [s for s in train if s not in grid]
    return grid


def train(config: TrainConfig, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Runs (or resumes) training; returns a summary with the final checkpoint path and MLflow run id.
    ``on_progress(step, max_steps)`` is called from a watcher thread as rank 0 advances."""
    from mlflow import MlflowClient

    from pipelines.data.prepare import verify_checksums
    from pipelines.ray_runtime import ensure_ray, is_private
    from pipelines.train.preflight import check_cluster_can_place, preflight

    startup = {"t0": time.time()}  # seconds from here to each milestone, logged by rank 0 as startup/*_s
    mark = lambda name: startup.setdefault(name, time.time() - startup["t0"])  # noqa: E731
    runs = storage.check_reachable(config.run.storage)  # a wrong bucket, key or endpoint: one line, nothing started
    check_tracking_server(tracking_uri())
    manifest = check_prepared_data(config)
    preflight(config, manifest)
    config.data.path = str(storage.location(config.data.path))
    for key in ("init_from", "base_from"):
        value = getattr(config.model, key)
        if value:
            setattr(config.model, key, str(resolve_checkpoint(value)))
    if config.model.arch == "face-mogle" and config.model.mode == "lora" and not config.model.base_from:
        raise ValueError(
            "model.base_from is required for face-mogle in lora mode: a run folder or checkpoint of a full-mode "
            "run (e.g. base_from=runs/flux-base-tiny) or a local diffusers FLUX folder"
        )
    run_dir = runs / config.run.name
    resume = newest_complete(run_dir)  # reports each newer checkpoint it passes over, and why
    set_aside_unusable_ray_snapshot(run_dir, resume)
    if resume is not None:
        print(f"[faceforge] resuming from {resume.name} (step {checkpoint_step(resume)})", file=sys.stderr)
        check_world_size(resume, config)
    mark("checks")
    ensure_ray()
    mark("ray")
    check_cluster_can_place(config, local=is_private() or not os.environ.get("RAY_ADDRESS"))
    leave_cpu_headroom(config)
    uri, run_id, resumed = open_mlflow_run(config, manifest, run_dir)
    print(f"[faceforge] MLflow run {run_id} ({'continued' if resumed else 'new'}) at {uri}", flush=True)
    mark("mlflow")
    client = MlflowClient(uri)
    try:
        verify_checksums(config.data.path, shards_to_verify(config, manifest))
    except ValueError:
        client.set_terminated(run_id, status="FAILED")  # a deterministic data error: no worker would get further
        raise
    mark("checksums")
    watcher = ProgressWatcher(run_dir, on_progress) if on_progress else None
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    try:
        extra = {
            "tracking_uri": uri,
            "run_id": run_id,
            "run_dir": str(run_dir),
            "storage_env": storage.storage_environment(),
            "startup": startup,
        }
        trainer = build_trainer(config, manifest, extra, mark)
        mark("trainer")
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as stop:
        # Ctrl-C (Ray Train's own handler aborts the run, then exits), or SIGTERM (the CLI turns it into a
        # KeyboardInterrupt): the run was stopped, not broken
        client.set_terminated(run_id, status="KILLED")
        raise KeyboardInterrupt from stop
    except Exception as error:
        client.set_terminated(run_id, status="FAILED")
        damaged = take_data_error(run_dir)
        if damaged:  # a worker found a damaged shard: say which, not the workers' tracebacks
            raise ValueError(damaged) from error
        raise
    finally:
        if watcher:
            watcher.stop()
        try:
            prune_checkpoints(run_dir, config.checkpoint.keep)
        except OSError as error:  # tidying up must not hide how the run ended
            print(f"[faceforge] could not prune old checkpoints in {run_dir}: {error}", file=sys.stderr)
    damaged = take_data_error(run_dir)
    if damaged:  # the workers stopped at a damaged shard (restarted ones stop at once on seeing the marker)
        client.set_terminated(run_id, status="FAILED")
        raise ValueError(damaged)
    client.set_terminated(run_id, status="FINISHED")
    # Ray names a checkpoint in object storage by its path without the scheme
    checkpoint = str(storage.native(run_dir / Path(result.checkpoint.path).name)) if result.checkpoint else None
    return {"run": config.run.name, "mlflow_run_id": run_id, "checkpoint": checkpoint, "metrics": result.metrics}


def check_world_size(checkpoint: Where, config: TrainConfig) -> None:
    """A ZeRO-1/2 checkpoint loads at any number of workers (the workers reshard its optimizer state); a ZeRO-3 one
    only at the number that wrote it: refused here in one line, before any worker starts."""
    from modeling.reshard import zero3_refusal

    saved = json.loads(storage.read_text(storage.location(checkpoint) / STATE_FILE)).get("world")
    if config.train.zero_stage == 3 and saved and saved != config.scaling.max_workers:
        raise zero3_refusal(checkpoint, saved, config.scaling.max_workers)


def take_data_error(run_dir: Where) -> str | None:
    """The line a worker left (``loop.DATA_ERROR``) when it met a damaged shard, removed once read."""
    from pipelines.train.loop import DATA_ERROR

    marker = storage.location(run_dir) / DATA_ERROR
    try:
        line = storage.read_text(marker).strip()
    except (FileNotFoundError, OSError):
        return None
    storage.delete(marker)
    return line or None


def set_aside_unusable_ray_snapshot(run_dir: Where, resume: Path | Location | None) -> Path | Location | None:
    """Ray refuses to start a run whose checkpoint list is empty or garbled (a full disk cut it short) or names a
    checkpoint folder that is gone (rotated, or removed by hand). The run folder itself says which checkpoints
    are intact, so such a list is moved aside and the workers resume from the newest intact one, ``resume``."""
    run_dir = storage.location(run_dir)
    snapshot = run_dir / RAY_SNAPSHOT
    try:
        data = storage.read_bytes(snapshot)
    except FileNotFoundError:
        return None
    try:
        listed = json.loads(data)
        if not isinstance(listed, dict):
            raise ValueError(f"a JSON {type(listed).__name__}, not an object")
        names = _checkpoint_dir_names(listed)
    except ValueError as error:
        problem = "is empty (0 bytes)" if not data else f"is not valid JSON ({len(data)} bytes: {error})"
    else:
        gone = sorted(n for n in names if not storage.is_dir(run_dir / n))
        if not gone:
            return None
        problem = f"names {', '.join(gone)}, no longer in the run folder"
    aside = run_dir / f"{RAY_SNAPSHOT}.set-aside"  # the last one only: evidence, not a history
    storage.write_bytes(aside, data)
    storage.delete(snapshot)
    then = f"resuming from {resume.name}" if resume else "no intact checkpoint: starting from step 0"
    print(f"[faceforge] Ray's checkpoint list {snapshot} {problem}; moved it to {aside.name}; {then}", file=sys.stderr)
    return storage.native(aside)


def _checkpoint_dir_names(node) -> set[str]:
    """Every ``checkpoint_dir_name`` anywhere in Ray's snapshot (its schema changes between Ray versions)."""
    if isinstance(node, dict):
        found = {node["checkpoint_dir_name"]} if isinstance(node.get("checkpoint_dir_name"), str) else set()
        return found.union(*(_checkpoint_dir_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_checkpoint_dir_names(v) for v in node))
    return set()


def prune_checkpoints(run_dir: Where, keep: int) -> None:
    """Rotation once the run has stopped, however it stopped: an interrupt between a checkpoint's manifest and
    the workers' own rotation (or a save cut short) must not leave more than ``keep`` behind."""
    from modeling.checkpoints import is_complete, stale_checkpoints

    for stale in stale_checkpoints(run_dir, keep):
        storage.delete(stale)
    for partial in storage.children(run_dir, folders_only=True):
        # a save the stop cut short (never finished): nothing writes it any more, and resume passes it over
        if partial.name.startswith("checkpoint_") and not is_complete(partial):
            print(f"[faceforge] removing {partial.name}: a save the stop cut short", file=sys.stderr)
            storage.delete(partial)


class ProgressWatcher:
    """Polls ``run_dir/progress.json`` (written by rank 0) and reports each new step to ``callback``."""

    def __init__(self, run_dir: Where, callback: Callable[[int, int], None], interval_s: float = 1.0) -> None:
        import threading

        self.path = storage.location(run_dir) / "progress.json"
        self.callback = callback
        self.interval_s = interval_s
        self.done = threading.Event()
        self.seen = -1
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            state = json.loads(storage.read_text(self.path))
        except (OSError, ValueError):
            return
        if state["step"] != self.seen:
            self.seen = state["step"]
            self.callback(int(state["step"]), int(state["max_steps"]))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self._poll()


def train_from_cli(config_path: str, overrides: list[str]) -> int:
    from ray.train import TrainingFailedError

    config = load_config(config_path, overrides)
    try:
        summary = train(config)
    except TrainingFailedError as error:
        # the workers' tracebacks were already streamed above; end with what failed and how to continue
        print(
            f"faceforge: training failed after {config.scaling.max_failures} restart(s): {error}\n"
            f"Fix the cause and re-run the same command: run {config.run.name!r} resumes from its last checkpoint.",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=2))
    return 0
