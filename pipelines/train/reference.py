"""Reference loops for the trainer's throughput: the same training step without the trainer around it.

``reference_samples_per_s(config, manifest, steps, mode)`` runs ``config.scaling.num_workers`` plain processes
joined by ``torch.distributed`` (gloo on CPU, NCCL on GPU) on this machine, each with the config's per-worker
batch, threads, dtype, loss, autocast and optimizer, on batches collated once and kept in memory:

- ``bare``: plain data parallel: the gradients averaged in one flat all-reduce, clipped, the optimizer stepped;
- ``deepspeed``: the same processes and batches, the step run by the DeepSpeed engine of the run's config.

What ``faceforge train`` reaches against ``bare`` is the trainer's overhead (``bench/trainer_overhead.py``; the
demo prints both). Local only: it needs the prepared data on this machine's disk.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from pathlib import Path

WARMUP = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_memory_batches(task, config, manifest: dict, rank: int, world: int, n: int = 4) -> list[dict]:
    """``n`` distinct collated batches of this rank's rows, read once (what a bare loop would keep in memory)."""
    import numpy as np
    import pyarrow.parquet as pq

    files = [s["file"] for s in manifest["shards"] if s["split"] == config.data.split]
    b = config.data.batch_size
    table = pq.read_table(Path(config.data.path) / "shards" / files[rank % len(files)], columns=task.columns)
    rng = np.random.default_rng([config.run.seed, rank])
    rows = [table.slice((i * b) % max(1, table.num_rows - b), b).to_pydict() for i in range(n)]
    return [task.collate(r, rng) for r in rows]


def step_fn(mode: str, config, task, model, device):
    """A function running one training step of mode ``bare`` or ``deepspeed`` on a batch."""
    import torch

    from pipelines.train.loop import cpu_autocast, deepspeed_config, make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params)
    autocast = cpu_autocast(config, device)
    generator = torch.Generator(device).manual_seed(config.run.seed)
    if mode == "bare":
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        def step(batch: dict) -> None:
            with autocast:
                loss = task.loss(model, batch, generator)
            loss.backward()
            # data parallel at its plainest: every gradient in one flat all-reduce, averaged
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(config), dist_init_required=False
    )

    def step(batch: dict) -> None:
        with autocast:
            loss = task.loss(engine, batch, generator)
        engine.backward(loss)
        engine.step()

    return step


def timed_steps(step, batches, steps: int, device) -> float:
    """Seconds for ``steps`` steps after a warm-up, all ranks starting and ending together."""
    import torch
    import torch.distributed as dist

    for i in range(WARMUP):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def setup(config, manifest: dict, rank: int):
    import torch

    from pipelines.train.task import NullText
    from pipelines.train.tasks import make_task

    device = torch.device("cuda", 0) if config.scaling.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
        torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if config.precision == "bf16" and device.type == "cuda" else torch.float32
    task = make_task(config, manifest)
    null = NullText.load(config.data.path).as_batch(device, dtype)
    torch.manual_seed(config.run.seed)
    model = task.build_model("cpu").to(device)
    return task, model, device, dtype, null


def _process(rank: int, world: int, port: int, mode: str, config_dict: dict, manifest: dict, steps: int, out) -> None:
    """(a) and (b): one of ``world`` plain processes joined by torch.distributed."""
    import torch.distributed as dist

    from pipelines.train.config import config_from_dict
    from pipelines.train.loop import _to

    config = config_from_dict(config_dict)
    # Ray runs its workers at a raised niceness (15 unless RAY_worker_niceness says otherwise) so that its own
    # daemons stay responsive; the reference runs at the same, or any other load on the machine would favour it
    os.nice(max(0, int(os.environ.get("RAY_worker_niceness", 15)) - os.nice(0)))
    os.dup2(2, 1)  # DeepSpeed's and torch's chatter goes to stderr: a caller's stdout may carry its results
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    os.environ.update({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("nccl" if config.scaling.use_gpu else "gloo", rank=rank, world_size=world)
    task, model, device, dtype, null = setup(config, manifest, rank)
    collated = in_memory_batches(task, config, manifest, rank, world)
    batches = [{k: _to(v, device, dtype) for k, v in b.items()} | null for b in collated]
    step = step_fn(mode, config, task, model, device)
    seconds = timed_steps(step, batches, steps, device)
    if rank == 0:
        out.put(config.data.batch_size * world * steps / seconds)
    dist.destroy_process_group()


def reference_samples_per_s(config, manifest: dict, steps: int, mode: str = "bare") -> float:
    """Samples per second (all workers together) of ``steps`` steps after a warm-up; see the module doc."""
    if mode not in ("bare", "deepspeed"):
        raise ValueError(f"mode {mode!r}: bare or deepspeed")
    import torch.multiprocessing as mp

    world = config.scaling.max_workers
    context = mp.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [
        context.Process(target=_process, args=(r, world, port, mode, config.to_dict(), manifest, steps, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    while True:
        try:
            rate = out.get(timeout=5)
            break
        except queue.Empty:
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"({mode}) a worker process exited with {failed[0].exitcode}") from None
    for p in procs:
        p.join()
    return rate
