"""``train_loop_per_worker``: ordinary PyTorch + DeepSpeed with three Ray calls at the edges.

Per worker: build the model (same seed on every rank), wrap it in a DeepSpeed engine (ZeRO stage 0-3,
bitsandbytes AdamW8bit as the client optimizer, cosine schedule with warm-up, clipping), keep an fp32 EMA
of the trainable weights outside DeepSpeed, and stream batches from this worker's Ray Data shard.

Checkpoints: every ``checkpoint.every`` steps each rank saves its DeepSpeed state into its own folder, all
ranks meet at a barrier, then ``ray.train.report`` merges the folders into one checkpoint. Rank 0 adds the
EMA + trainable weights (safetensors + config.json, ready to serve) and ``trainer_state.json``.

MLflow: rank 0 buffers metrics and writes them only after the checkpoint that covers them is persisted.
A crash therefore loses exactly the steps that will be re-run from that checkpoint, and MLflow ends with
each logged step once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling import storage
from modeling.checkpoints import (
    MANIFEST_FORMAT,
    STATE_FILE,
    WEIGHTS_DIR,
    checkpoint_name,
    file_records,
    is_complete,
    newest_complete,
    no_space_left,
    rank_marker,
    stale_checkpoints,
    weights_dir,
    write_manifest,
)
from pipelines.train.config import TrainConfig, config_from_dict
from pipelines.train.feed import COPY, DATA_POSITION, build_dataset, remaining_rows, row_names, with_copies
from pipelines.train.restarts import record_restart
from pipelines.train.task import NullText, Task
from pipelines.train.tasks import make_task

DEEPSPEED_DIR = "deepspeed"
PEAK_FLOPS = 989e12  # H100 SXM bf16 dense: what MFU is reported against
DEEPSPEED_TAG = "state"
# the one line a worker leaves in the run folder when it met a damaged shard (the driver reports it and fails
# the run; restarted workers see it and stop at once: a damaged file is not a fault that a retry mends)
DATA_ERROR = "data_error.txt"
# the metric rows a checkpoint covers, kept inside it: logged from there on resume if rank 0 died before its flush
PENDING_METRICS = "metrics_pending.json"


def lr_lambda(config: TrainConfig):
    t = config.train
    warmup = max(t.warmup_steps, 0)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]):
    t = config.train
    if t.optimizer == "adamw8bit":
        # bitsandbytes' AdamW8bit (its CUDA kernel on GPU); on CPU our chunked update, same state layout
        from modeling.optim import AdamW8bit

        return AdamW8bit(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # as the official Face-MoGLE recipe: Adam's bias correction, and no step-size growth during warm-up
        return Prodigy(
            params,
            lr=t.lr,
            betas=t.betas,
            weight_decay=t.weight_decay,
            use_bias_correction=True,
            safeguard_warmup=True,
        )
    return None  # deepspeed_adamw: DeepSpeed builds it from the config


def deepspeed_config(config: TrainConfig, world: int | None = None) -> dict:
    """``world``: the workers this group has (an elastic run's may be fewer than ``scaling.num_workers``' max);
    each accumulates enough micro-batches that a step stays the configured global batch."""
    t = config.train
    ds = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": config.grad_accum_at(world or config.scaling.max_workers),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # bitsandbytes and Prodigy are client optimizers DeepSpeed has not certified for ZeRO
        "zero_allow_untested_optimizer": True,
        # bf16 weights on GPU; a CPU run in bf16 keeps fp32 weights and autocasts the forward (cpu_autocast)
        "bf16": {"enabled": config.precision == "bf16" and config.scaling.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        # small tiny-model tensors stay replicated, which avoids gathering hundreds of tiny params per step
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1e4
    if t.optimizer == "deepspeed_adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay},
        }
        if not config.scaling.use_gpu:
            ds["optimizer"]["params"]["torch_adam"] = True  # fused CUDA Adam does not exist on CPU
    return ds


def cpu_autocast(config: TrainConfig, device: torch.device):
    """bf16 on a CPU: weights, gradients and optimizer stay fp32, the forward runs under autocast. CPUs with
    bf16 matrix units (AVX512-BF16, AMX) run its GEMMs several times faster than fp32."""
    if config.precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full tensors on every rank for the duration of the block (only ZeRO-3 partitions parameters)."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


class MetricBuffer:
    """Rank 0's metrics, held until the checkpoint that covers them is durable."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.rows: list[tuple[str, float, int]] = []
        self.client = None
        self.run_id = run_id
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.extend((k, float(v), step) for k, v in metrics.items())

    def flush(self) -> None:
        if not self.client or not self.rows:
            self.rows = []
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in self.rows]
        for start in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 900])
        self.rows = []

    def save(self, directory: Path) -> None:
        """The rows not yet in MLflow, written into a checkpoint being staged: the checkpoint is complete (a resume
        point) before ``flush`` runs, and rank 0 may die in between (a node lost, the tracking server down)."""
        (directory / PENDING_METRICS).write_text(json.dumps(self.rows))

    def recover(self, checkpoint) -> None:
        """On resume: logs the rows the checkpoint carried that MLflow lacks (its flush never happened), each
        (metric, step) once; a flush that did happen leaves nothing to log."""
        try:
            rows = json.loads(storage.read_text(storage.location(checkpoint) / PENDING_METRICS))
        except FileNotFoundError:
            return
        if not self.client or not rows:
            return
        keys = {key for key, _, _ in rows}  # one history read per metric, not per row
        logged = {key: {m.step for m in self.client.get_metric_history(self.run_id, key)} for key in keys}
        missing = [(key, value, step) for key, value, step in rows if step not in logged[key]]
        if missing:
            print(
                f"[faceforge] logging {len(missing)} metric values of steps up to {missing[-1][2]} that the last "
                f"run saved in {storage.location(checkpoint).name} but never sent to MLflow",
                flush=True,
            )
            self.rows = [*missing, *self.rows]
            self.flush()

    def log_artifact(self, path: str, artifact_path: str) -> None:
        if self.client:
            self.client.log_artifact(self.run_id, path, artifact_path)


def train_loop_per_worker(loop_config: dict) -> None:
    startup = Startup(loop_config.get("startup"))
    import deepspeed
    import ray.train
    import ray.train.torch

    startup.mark("imports")
    storage.adopt_environment(loop_config.get("storage_env"))
    config = config_from_dict(loop_config["config"])
    manifest = loop_config["manifest"]
    if loop_config.get("run_dir") and storage.exists(storage.location(loop_config["run_dir"]) / DATA_ERROR):
        return
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
        # denormal floats (tiny softmax tails, bf16 round trips) run tens of times slower on x86; a small model
        # on CPU spends up to a third of its step on them. Flushing them to zero changes nothing it learns.
        torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if config.precision == "bf16" and device.type == "cuda" else torch.float32
    autocast = cpu_autocast(config, device)
    task = make_task(config, manifest)
    null = NullText.load(config.data.path).as_batch(device, dtype)

    torch.manual_seed(config.run.seed)  # identical initial weights on every rank
    model = task.build_model("cpu")
    if config.model.init_from:
        load_initial_weights(model, config.model.init_from)
    model.to(device)
    startup.mark("model")
    if config.train.compile:
        model.compile()  # in place: parameter names (checkpoints, EMA) stay those of the eager model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(config, params)
    scheduler_fn = lr_lambda(config)
    startup.mark("optimizer")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params if optimizer is None else None,
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, scheduler_fn)),
        config=deepspeed_config(config, world),
        dist_init_required=False,
    )
    startup.mark("deepspeed")
    ema = None
    if config.ema.enabled:
        from modeling.ema import EMA

        with gathered(params, config.train.zero_stage):
            ema = EMA([n for n, _ in named], params, decay=config.ema.decay, warmup=config.ema.warmup)

    step, epoch, consumed_before = 0, 0, []
    source = resume_point(loop_config.get("run_dir"), rank)
    checkpoint = ray.train.get_checkpoint() if source is None else None
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as from_ray:
        if source is None and from_ray is not None and is_complete(Path(from_ray)):
            source = Path(from_ray)
        if source is not None:
            step, epoch, consumed_before = restore(engine, ema, source)
    if source is not None and rank == 0:
        done = f", {len(consumed_before)} of its rows already trained on" if consumed_before else ""
        print(f"[faceforge] resumed from {source.name}: step {step} (pass {epoch}{done})", flush=True)
    startup.mark("restored")  # the EMA built and, on a resume, the checkpoint read

    metrics = MetricBuffer(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None
    if metrics is not None:
        record_restart(loop_config.get("run_dir"), metrics.client, metrics.run_id, source, step, world)
        if source is not None:
            metrics.recover(source)
    startup.mark("mlflow_client")  # rank 0: MLflow imported, its client made, a restart recorded
    # the configured global batch, whatever this group's size: each worker accumulates grad_accum micro-batches
    global_batch, grad_accum = config.global_batch, config.grad_accum_at(world)
    shard = ray.train.get_dataset_shard("train")
    bar = _progress(config, step) if rank == 0 else None
    progress_file = ProgressFile(loop_config.get("run_dir"), config.train.max_steps) if rank == 0 else None
    window = Window(device)
    holdout = None
    flops_per_sample = None if rank == 0 and device.type == "cuda" else 0.0

    while step < config.train.max_steps:
        rng = np.random.default_rng([config.run.seed, rank, epoch])
        seen: list[str] = []  # this rank's rows of the pass since it started (or resumed), for the checkpoint
        # a run resumed within a pass reads only what the pass has left; the next pass is whole again
        feed = rest_of_pass(config, manifest, task, loop_config, consumed_before, rank) if consumed_before else shard
        iterator = shard_batches(feed, config, rng, task.collate, seen)
        got_batch = False
        while step < config.train.max_steps:
            window.lap()
            try:
                batch = next(iterator, None)
            except Exception as error:
                raise_if_damaged_data(error, config, manifest, loop_config.get("run_dir"))
                raise
            window.lap("data_wait")
            if batch is None:
                break
            got_batch = True
            startup.mark("first_batch")
            batch = {k: _to(v, device, dtype) for k, v in batch.items()} | null
            generator = torch.Generator(device).manual_seed(hash((config.run.seed, rank, step, epoch)) % 2**63)
            window.lap("to_device")
            # MFU needs the model FLOPs of a step: rank 0 counts its first forward + backward on GPU
            counter = FlopCounterMode(display=False) if flops_per_sample is None else nullcontext()
            with counter:
                with autocast:
                    loss = task.loss(engine, batch, generator)
                window.lap("forward")
                engine.backward(loss)  # ZeRO reduces the gradients across ranks inside backward
                window.lap("backward_allreduce")
            if flops_per_sample is None:
                flops_per_sample = counter.get_total_flops() / config.data.batch_size
            window.add_loss(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window.lap("optimizer")
            if not boundary:
                continue
            step += 1
            if ema is not None:
                with gathered(params, config.train.zero_stage):
                    ema.update(params)
                window.lap("ema")
            startup.mark("first_step")
            _maybe_inject_fault(config, loop_config, rank, step)
            if bar is not None:
                bar.update(1)
                progress_file.update(step)
            window.lap("progress")
            if step % config.logging.log_every == 0 or step == config.train.max_steps:
                elapsed = window.elapsed()
                stats = {
                    "train/loss": window.mean_loss(),
                    "train/lr": float(scheduler.get_last_lr()[0]),
                    "train/grad_norm": _grad_norm(engine),
                    "train/samples_per_s": global_batch * (window.n / grad_accum) / elapsed,
                    "train/data_wait_frac": window.phases.get("data_wait", 0.0) / elapsed,
                    "train/epoch": epoch * loop_config.get("epochs_per_pass", 1),
                    "train/world_size": world,
                    "train/grad_accum": grad_accum,
                    **window.breakdown(grad_accum),
                    **startup.report(),
                }
                if device.type == "cuda":
                    stats["sys/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if flops_per_sample:
                        per_gpu = stats["train/samples_per_s"] / world
                        stats["train/mfu"] = per_gpu * flops_per_sample / loop_config.get("peak_flops", PEAK_FLOPS)
                if metrics is not None:
                    metrics.add(step, stats)
                    bar.set_description(f"train {config.run.name} loss {stats['train/loss']:.4f}")
                window = Window(device)
            sample_every = config.logging.sample_every
            if (
                rank == 0
                and ema is not None
                and ((sample_every and step % sample_every == 0) or step == config.train.max_steps)
            ):
                holdout = holdout or load_holdout(task, config)
                log_sample_grid(task, config, ema, holdout, null, step, metrics, device)
                window.lap("samples")
            if step % config.checkpoint.every == 0 or step == config.train.max_steps:
                save_and_report(
                    engine,
                    ema,
                    task,
                    params,
                    config,
                    step,
                    epoch,
                    rank,
                    metrics,
                    stats_for_report(metrics),
                    loop_config.get("run_dir"),
                    consumed_before,
                    seen,
                )
                window.lap("checkpoint")
        if not got_batch and not consumed_before:
            raise RuntimeError(
                f"worker {rank} got no batch of {config.data.batch_size} rows from {config.data.path}; "
                "lower data.batch_size or scaling.num_workers, or prepare more data"
            )
        epoch += 1
        consumed_before = []
    if bar is not None:
        bar.close()


class Window:
    """One logging window: the summed loss (kept on the device: no sync per step) and the seconds each phase of
    the step took (``time/<phase>_ms`` per step when logged). On a GPU the phases are host time: kernels run
    asynchronously, so they show where the host waits, not what the device computes."""

    def __init__(self, device) -> None:
        self.loss = torch.zeros((), device=device)
        self.n = 0
        self.phases: dict[str, float] = {}
        self.t0 = self.last = time.perf_counter()

    def lap(self, phase: str | None = None) -> None:
        now = time.perf_counter()
        if phase is not None:
            self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.n += 1

    def mean_loss(self) -> float:
        return float(self.loss) / max(1, self.n)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def breakdown(self, grad_accum: int) -> dict[str, float]:
        steps = max(1, self.n // grad_accum)
        timed = {f"time/{k}_ms": 1000 * v / steps for k, v in self.phases.items()}
        timed["time/other_ms"] = max(0.0, 1000 * (self.elapsed() - sum(self.phases.values())) / steps)
        return timed


class Startup:
    """Seconds from the moment the driver's ``train`` was called to each milestone of a worker's start, reported
    with the first logged metrics (``startup/*_s``): the driver's own marks come in ``loop_config``."""

    def __init__(self, driver: dict | None) -> None:
        self.t0 = (driver or {}).get("t0")
        self.marks = {k: v for k, v in (driver or {}).items() if k != "t0"}
        self.reported = False
        self.mark("worker")

    def mark(self, name: str) -> None:
        if self.t0 is not None and name not in self.marks:
            self.marks[name] = time.time() - self.t0

    def report(self) -> dict[str, float]:
        if self.reported or self.t0 is None:
            return {}
        self.reported = True
        return {f"startup/{k}_s": v for k, v in self.marks.items()}


def shard_chunk_rows(config: TrainConfig) -> int:
    """Rows a worker takes from Ray Data at a time and shuffles together: ``data.shuffle_buffer`` rounded up to
    whole micro-batches, at least four of them."""
    b = config.data.batch_size
    return b * max(4, -(-config.data.shuffle_buffer // b))


def shard_batches(shard, config: TrainConfig, rng: np.random.Generator, collate, seen: list[str] | None = None):
    """One epoch of this worker's micro-batches: chunks of ``shard_chunk_rows`` rows from the Ray Data shard (in
    the epoch's file order), each shuffled with ``rng`` and cut into collated micro-batches; fewer than
    ``batch_size`` rows left at the end of the epoch are dropped.

    Ray Data's own per-batch path (block slicing, a local shuffle buffer, formatting and the collate in a
    prefetch thread) runs once per chunk instead of once per step: it shares the worker's cores with training,
    and per step it cost more than the collate itself.

    ``seen`` (when given) gets each yielded micro-batch's row names (``feed.row_names``) as it is yielded."""
    b = config.data.batch_size
    for chunk in shard.iter_batches(
        batch_size=shard_chunk_rows(config), batch_format="numpy", prefetch_batches=config.data.prefetch_batches
    ):
        n = len(next(iter(chunk.values())))
        order = rng.permutation(n) if config.data.shuffle_buffer else np.arange(n)
        columns = {k: v for k, v in chunk.items() if k != COPY}
        for start in range(0, n - b + 1, b):
            pick = order[start : start + b]
            if seen is not None:
                seen.extend(row_names(chunk, pick))
            yield collate({k: v[pick] for k, v in columns.items()}, rng)


def rest_of_pass(config: TrainConfig, manifest: dict, task: Task, loop_config: dict, consumed: list[str], rank: int):
    """This rank's part of what a resumed pass has left: rank 0 rebuilds the pass without the ``consumed`` rows and
    splits it across the ranks as Ray Train splits the whole one (equal parts), every rank takes its part."""
    import ray.train
    import torch.distributed as dist

    parts = [None]
    if rank == 0:
        repeats = loop_config.get("epochs_per_pass", 1)
        dataset, _ = build_dataset(config, manifest, task.columns, materialize=False)
        dataset = dataset.materialize() if repeats > 1 else dataset  # read once, not once per copy
        dataset = remaining_rows(with_copies(dataset, repeats), consumed)
        parts = [dataset.streaming_split(ray.train.get_context().get_world_size(), equal=True)]
    dist.broadcast_object_list(parts, src=0)
    return parts[0][rank]


def stats_for_report(metrics: MetricBuffer | None) -> dict:
    if metrics is None or not metrics.rows:
        return {}
    latest = {}
    for key, value, step in metrics.rows:
        latest[key] = value
        latest["step"] = step
    return latest


def _to(value, device, dtype):
    if isinstance(value, torch.Tensor):
        value = value.to(device, non_blocking=True)
        return value.to(dtype) if value.is_floating_point() else value
    return value


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


class ProgressFile:
    """Rank 0's step count in ``run_dir/progress.json`` (at most once a second): what a driver shows as a
    progress line with an ETA while ``trainer.fit`` blocks, without reading the workers' logs."""

    NAME = "progress.json"

    def __init__(self, run_dir: str | None, max_steps: int) -> None:
        self.path = storage.location(run_dir) / self.NAME if run_dir else None
        self.max_steps = max_steps
        self.last = 0.0

    def update(self, step: int) -> None:
        now = time.time()
        if self.path is None or (now - self.last < 1.0 and step < self.max_steps):
            return
        self.last = now
        storage.write_text(self.path, json.dumps({"step": step, "max_steps": self.max_steps, "time": now}))


def _progress(config: TrainConfig, start: int):
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=config.train.max_steps, desc=f"train {config.run.name}", unit="step")
    if start:
        bar.update(start)
    return bar


def _maybe_inject_fault(config: TrainConfig, loop_config: dict, rank: int, step: int) -> None:
    fault = config.fault
    if fault.kill_rank != rank or fault.kill_at_step != step:
        return
    marker = storage.location(loop_config["run_dir"]) / ".fault_injected"
    if storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rank} killed at step {step}\n")
    print(f"[faceforge] fault injection: rank {rank} exits at step {step}", flush=True)
    os._exit(1)


# ------------------------------------------------------------------------------------------- checkpoints


def resume_point(run_dir: str | None, rank: int) -> Path | None:
    """The newest checkpoint of the run folder whose files all match their manifest, chosen by rank 0 and
    shared with every rank (the others would only repeat its reading of the same shared folder).

    The run folder comes before Ray's own latest checkpoint: Ray's can lag it (a worker that dies right after
    a report may take the controller down before it registered that report) or be the damaged one."""
    import torch.distributed as dist

    chosen = [newest_complete(run_dir, deep=True) if rank == 0 and run_dir else None]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def save_and_report(
    engine,
    ema,
    task: Task,
    params,
    config,
    step,
    epoch,
    rank,
    metrics,
    report_metrics,
    run_dir: str | None,
    consumed_before: list[str] = (),
    seen: list[str] = (),
) -> None:
    """Every rank stages its files and hands them to ``ray.train.report``, which copies them into
    ``run_dir/checkpoint_NNNNNN``; once all ranks' copies are in, rank 0 writes the manifest and rotates.

    The checkpoint records the data position: the rows of pass ``epoch`` trained on so far (those before a
    resume, ``consumed_before``, and every rank's ``seen`` since)."""
    import ray.train
    import torch.distributed as dist

    name = checkpoint_name(step)
    every_seen = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(list(seen), every_seen, dst=0)
    target = storage.location(run_dir) / name if run_dir else None
    if rank == 0 and target is not None and storage.is_dir(target):
        # this step's folder from an abandoned attempt: its stale manifest must not vouch for the new files
        storage.delete(target)
    with tempfile.TemporaryDirectory(prefix="faceforge-ckpt-") as tmp:
        directory = Path(tmp)
        with no_space_left(directory):
            # a frozen base (Face-MoGLE's lora mode: 23.8 of FLUX-dev's 24 GB) is rebuilt from base_from on resume
            engine.save_checkpoint(
                str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=bool(_frozen(engine))
            )
            (directory / rank_marker(rank)).touch()
            with gathered(params, config.train.zero_stage):
                if rank == 0:
                    trainable = {
                        n: p.detach().float().cpu() for n, p in engine.module.named_parameters() if p.requires_grad
                    }
                    save_serving_weights(directory / WEIGHTS_DIR, task, engine.module, trainable, ema)
            if rank == 0:
                state = {
                    "step": step,
                    "epoch": epoch + 1,
                    "ema_updates": ema.num_updates if ema else 0,
                    "world": dist.get_world_size(),
                    "manifest": MANIFEST_FORMAT,
                }
                (directory / STATE_FILE).write_text(json.dumps(state))
                consumed = [*consumed_before, *(n for part in every_seen for n in part)]
                (directory / DATA_POSITION).write_text(json.dumps({"pass": epoch, "consumed": consumed}))
                if metrics is not None:
                    metrics.save(directory)
        records = file_records(directory)
        every_rank = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(records, every_rank, dst=0)
        dist.barrier()
        try:
            with no_space_left(target or "the run's storage"):
                ray.train.report(
                    {**report_metrics, "step": step},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=name,
                )
        except OSError:
            if target is not None:
                _quietly_delete(target)  # a partial copy only takes the space a retry needs
            raise
    dist.barrier()  # every rank's files are in the run folder
    if rank == 0 and target is not None:
        finish_checkpoint(target, [r for part in every_rank for r in part], config.checkpoint.keep)
    if metrics is not None:
        metrics.flush()


def finish_checkpoint(target: storage.Where, records: list[dict], keep: int) -> None:
    """Rank 0, once every rank's files are in ``target``: the manifest that makes it complete, written last,
    then rotation down to ``keep`` complete checkpoints."""
    target = storage.location(target)
    write_manifest(target, records)
    for stale in stale_checkpoints(target.parent, keep):
        if not is_complete(stale):
            print(f"[faceforge] removing {stale.name}: an unfinished checkpoint older than {target.name}", flush=True)
        _quietly_delete(stale)


def _quietly_delete(where: storage.Where) -> None:
    try:
        storage.delete(where)
    except OSError:
        pass


def raise_if_damaged_data(error: Exception, config: TrainConfig, manifest: dict, run_dir: str | None) -> None:
    """A shard that cannot be decoded (a garbled page behind an intact footer: "ZSTD decompression failed") ends
    the run in one line naming the shard and the fix, left for the driver in the run folder; other errors pass."""
    from pipelines.data.prepare import REPREPARE, DamagedShard, verify_checksums

    text = str(error)
    if not any(s in text for s in ("ZSTD", "Parquet", "parquet", "Corrupt", "corrupt", "decompress", "thrift")):
        return
    shards = [s for s in manifest["shards"] if s["split"] == config.data.split]
    try:
        verify_checksums(config.data.path, shards)
        line = (
            f"{config.data.path}: a '{config.data.split}' shard could not be decoded ({_first_line(text)}); {REPREPARE}"
        )
    except DamagedShard as damaged:
        line = str(damaged)
    if run_dir:
        storage.write_text(storage.location(run_dir) / DATA_ERROR, line + "\n")
    raise DamagedShard(line) from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "Error" in line or "error" in line]
    return (lines[-1] if lines else text.strip().splitlines()[0])[:300]


def save_serving_weights(directory: Path, task: Task, model, trainable: dict, ema) -> None:
    from modeling.weights import save_weights

    ema_state = {k: v.cpu() for k, v in ema.shadow_state_dict().items()} if ema else None
    save_weights(directory, trainable, task.weights_config(model), ema_state)


def restore(engine, ema, source) -> tuple[int, int, list[str]]:
    """Model, optimizer, scheduler and EMA from a checkpoint folder (one in object storage is first copied into a
    local temp folder: DeepSpeed reads local files); returns the step, the pass and its rows already trained on."""
    with storage.local_folder(source) as directory:
        return _restore(engine, ema, directory)


def _restore(engine, ema, directory: Path) -> tuple[int, int, list[str]]:
    from safetensors.torch import load_file

    state = json.loads((directory / STATE_FILE).read_text())
    frozen = _frozen(engine)

    def load_module(src: dict, dst: torch.nn.Module) -> None:
        # a checkpoint without the frozen base: those tensors keep what base_from gave them; anything else missing
        # or unexpected is a checkpoint of another model
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - frozen)
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{directory}: the checkpoint does not match this model "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )

    import torch.distributed as dist

    saved_world, world = int(state.get("world", 0)) or None, dist.get_world_size()
    reshard = saved_world is not None and saved_world != world and engine.zero_optimization_stage() in (1, 2)
    if saved_world is not None and saved_world != world and engine.zero_optimization_stage() == 3:
        from modeling.reshard import zero3_refusal

        raise zero3_refusal(directory, saved_world, world)
    # at another world size DeepSpeed loads the module and the scheduler, the optimizer is re-cut here
    load_path, _ = engine.load_checkpoint(
        str(directory / DEEPSPEED_DIR),
        tag=DEEPSPEED_TAG,
        load_optimizer_states=not reshard,
        custom_load_fn=load_module if frozen else None,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory / DEEPSPEED_DIR}")
    if reshard:
        load_resharded_optimizer(engine, directory / DEEPSPEED_DIR / DEEPSPEED_TAG)
        if dist.get_rank() == 0:
            print(f"[faceforge] {directory.name}: resharded from {saved_world} to {world} workers", flush=True)
    if ema is not None:
        from modeling.weights import EMA_FILE

        shadow = load_file(str(directory / WEIGHTS_DIR / EMA_FILE))
        ema.load_state_dict(
            {"decay": ema.decay, "warmup": ema.warmup, "num_updates": state["ema_updates"], "shadow": shadow}
        )
    position = directory / DATA_POSITION
    if position.is_file():  # where in its pass the checkpoint was taken
        data = json.loads(position.read_text())
        return int(state["step"]), int(data["pass"]), list(data["consumed"])
    return int(state["step"]), int(state["epoch"]), []  # an older checkpoint: the next pass, whole


def load_resharded_optimizer(engine, folder: Path) -> None:
    """This rank's share of a ZeRO-1/2 optimizer checkpoint written at another world size (``modeling.reshard``):
    the fp32 master slice and the base optimizer's state (8-bit states included) for it, then the model's
    (bit16) weights refreshed from the master weights as after an optimizer step."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from modeling.reshard import ZeroCheckpoint

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        raise ValueError(f"{folder}: resharding needs DeepSpeed's ZeRO-1/2 optimizer, not {type(zero).__name__}")
    base = zero.optimizer
    args = getattr(base, "args", None)  # bitsandbytes: 8-bit states for slices of min_8bit_size elements or more
    min_8bit_size = args.min_8bit_size if getattr(args, "optim_bits", 32) == 8 else None
    checkpoint = ZeroCheckpoint(folder)
    if checkpoint.groups != len(base.param_groups):
        raise ValueError(f"{folder}: {checkpoint.groups} parameter groups, this run has {len(base.param_groups)}")
    for i, group in enumerate(base.param_groups):
        numel = sum(p.numel() for p in zero.round_robin_bit16_groups[i]) + sum(zero.round_robin_bit16_padding[i])
        if checkpoint.numel(i) != numel:
            raise ValueError(f"{folder}: group {i} holds {checkpoint.numel(i)} elements, this model's {numel}")
        process_group = zero.real_dp_process_group[i]
        part = checkpoint.partition(
            dist.get_world_size(group=process_group), dist.get_rank(group=process_group), min_8bit_size
        )[i]
        flat = zero.single_partition_of_fp32_groups[i]
        flat.data.copy_(part.master.to(flat.device, flat.dtype))
        # like Optimizer.load_state_dict: a tensor step stays where it was saved, the rest goes to the weights
        base.state[flat] = {
            k: v.to(flat.device) if torch.is_tensor(v) and k != "step" else v for k, v in part.state.items()
        }
        group.update(part.settings)  # lr as scheduled at the save, betas, ...
    zero._hp_optimizer_states_linked = False  # DeepSpeed links the new state tensors at its next step
    zero.update_lp_params()


def _frozen(engine) -> set[str]:
    return {n for n, p in engine.module.named_parameters() if not p.requires_grad}


def load_initial_weights(model, directory: str) -> None:
    """Initialise from another run's serving weights (EMA when present): 512 from 256, MoGLE base, ...

    A lora-mode Face-MoGLE folder holds only the trainable tensors (LoRA + MoGLE; the frozen base comes from
    base_from), so a state that is exactly the model's trainable set loads as that set.
    """
    from modeling.face_mogle import load_trainable
    from modeling.weights import EMA_FILE, load_into, load_weights

    with storage.local_folder(weights_dir(directory)) as weights:
        state, _ = load_weights(weights, ema=(weights / EMA_FILE).is_file())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) == trainable and trainable != set(model.state_dict()):
        load_trainable(model, state)
    else:
        load_into(model, state)


# ------------------------------------------------------------------------------------------- sample grids


def load_holdout(task: Task, config: TrainConfig) -> dict:
    """Fixed conditions from the held-out split (falls back to the training split when there is none)."""
    import pyarrow.parquet as pq

    manifest = task.manifest
    n = config.logging.n_samples
    for split in (config.data.holdout_split, config.data.split):
        files = [s["file"] for s in manifest["shards"] if s["split"] == split]
        if files:
            shard = storage.location(config.data.path) / "shards" / files[0]
            table = pq.read_table(shard.path, filesystem=shard.fs, columns=task.columns)
            return table.slice(0, n).to_pydict()
    raise FileNotFoundError(f"{config.data.path}: no shards to draw sample conditions from")


@torch.no_grad()
def log_sample_grid(task: Task, config, ema, rows: dict, null: dict, step: int, metrics, device) -> None:
    """Samples from the EMA weights on fixed conditions and seeds: condition | sample | ground truth."""
    from PIL import Image

    from modeling.codecs import load_codec

    model = task.build_model("cpu")
    ema.copy_to(model)
    model.to(device).eval()
    conditions = task.collate(rows, np.random.default_rng(0), fixed=True)
    conditions = {k: _to(v, device, torch.float32) for k, v in conditions.items()} | {
        k: v.float() if v.is_floating_point() else v for k, v in null.items()
    }
    truth = conditions.pop("latent")
    seeds = list(range(truth.shape[0]))
    latents = task.sample(model, conditions, seeds, config.logging.sample_steps)
    codec = load_codec(task.manifest["codec"].get("spec", task.manifest["codec"]["name"]), device)
    to_pixels = lambda x: ((codec.decode(x.float()) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)  # noqa: E731
    generated, real = to_pixels(latents).cpu().numpy(), to_pixels(truth).cpu().numpy()
    cond_images = task.condition_images(rows)
    grid = np.concatenate([np.concatenate([c, g, r], axis=1) for c, g, r in zip(cond_images, generated, real)], axis=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"samples_step{step:07d}.png"
        Image.fromarray(grid).save(path)
        if metrics is not None:
            metrics.log_artifact(str(path), "samples")
    del model
