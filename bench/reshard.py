"""What resharding a ZeRO-2 + 8-bit AdamW checkpoint costs, through the trainer's own restore.

    python bench/reshard.py [--steps 5] [--out DIR]

A tiny model (three Linear layers in three parameter groups: 16000 weights with 8-bit states at 1 and 2 workers,
6000 with 8-bit states at 1 worker and 32-bit at 2, 373 biases with 32-bit states) trains 3 steps at 2 workers
with DeepSpeed ZeRO-2 and ``modeling.optim.AdamW8bit`` (gloo on 127.0.0.1, CPU, no Ray) and saves; then

  2 -> 1  one worker restores that checkpoint (``pipelines.train.loop._restore``), saves it again at once, and
          trains ``--steps`` steps; 2 workers continue the original for the same steps on the same batches;
  1 -> 2  two workers restore the one-worker checkpoint and train ``--steps`` steps; the one worker's own
          steps are the continuation it is compared with.

Every step sees the same 8 samples whatever the worker count (4 per worker at 2, 8 at 1). As a baseline, 1
worker also trains from the start (no reshard): 8-bit states are encoded on each worker count's own block grid at
every step, so two worker counts drift apart even without one. Progress goes to stderr; ONE JSON line is printed
last on stdout: per direction the error of each 8-bit moment (largest, relative to its block's absmax; and
relative in norm) and how far the weights are from the continuation after 1 and ``--steps`` steps; the same
weight figures for the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH = 8
LR = 1e-2
TRAIN_STEPS = 3
READY = "ready"


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 200), torch.nn.GELU(), torch.nn.Linear(200, 48), torch.nn.GELU(), torch.nn.Linear(48, 125)
    )


def param_groups(model: torch.nn.Module) -> list[dict]:
    first, second, third = model[0], model[2], model[4]
    return [
        {"params": [first.weight, second.weight]},  # 16000: 8-bit states at 1 and 2 workers
        {"params": [third.weight]},  # 6000: 8-bit at 1 worker, 32-bit (under min_8bit_size) at 2
        {"params": [first.bias, second.bias, third.bias], "weight_decay": 0.0},  # 373: 32-bit
    ]


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step ``step``'s global batch (the same 8 samples at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 125, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(world: int, stage: int = 2):
    import deepspeed

    from modeling.optim import AdamW8bit

    model = build_model()
    optimizer = AdamW8bit(param_groups(model), lr=LR, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # a warm-up that is still rising at the save: a resume must restore the scheduled learning rate
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8)),
        config={
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        },
        dist_init_required=False,
    )
    return engine


def _save(engine, directory: Path, step: int) -> None:
    import torch.distributed as dist

    from modeling.checkpoints import STATE_FILE
    from pipelines.train.loop import DEEPSPEED_DIR, DEEPSPEED_TAG

    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    if dist.get_rank() == 0:
        state = {"step": step, "epoch": 0, "ema_updates": 0, "world": dist.get_world_size()}
        (directory / STATE_FILE).write_text(json.dumps(state))
    dist.barrier()
    if dist.get_rank() == 0:
        (directory / READY).touch()  # every rank's files are written: a waiting job may load it


def _steps(engine, start: int, count: int, rank: int, world: int) -> list[dict]:
    """``count`` training steps from step ``start``; rank 0 keeps the weights and lr after each."""
    out = []
    for step in range(start, start + count):
        x, y = batch(step, rank, world)
        loss = (engine(x) - y).pow(2).mean()
        engine.backward(loss)
        engine.step()
        out.append({"lr": engine.get_lr()[0], "weights": {k: v.clone() for k, v in engine.module.state_dict().items()}})
    return out


def worker(rank: int, world: int, port: int, job: dict) -> None:
    """One process of a ``world``-worker job: ``job["load"]`` (a checkpoint folder, waited for) or a fresh start,
    then ``job["save"]`` (saved once loaded or trained), then ``job["steps"]`` steps; rank 0 writes
    ``job["result"]``. Options: ``stage`` (ZeRO stage, 2), ``log`` (a file for the process's stdout),
    ``refusal`` (the load is expected to fail with a ValueError: its message is the result)."""
    import deepspeed  # noqa: F401  (the slow imports happen while an earlier job still trains)
    import torch.distributed as dist

    from pipelines.train.loop import _restore

    torch.set_num_threads(1)
    if job.get("log"):
        sys.stdout = open(job["log"], "a", buffering=1)  # noqa: SIM115  (the process's stdout until it ends)
    if job.get("load"):
        _wait_for(Path(job["load"]) / READY)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        engine = _engine(world, job.get("stage", 2))
        result: dict = {}
        if job.get("refusal"):
            try:
                _restore(engine, None, Path(job["load"]))
            except ValueError as error:
                result["refusal"] = str(error)
            if rank == 0:
                torch.save(result, job["result"])
            return
        if job.get("load"):
            step, _, _ = _restore(engine, None, Path(job["load"]))
            result["loaded"] = {k: v.clone() for k, v in engine.module.state_dict().items()}
        else:
            result["trained"] = _steps(engine, 0, TRAIN_STEPS, rank, world)
            step = TRAIN_STEPS
        if job.get("save"):
            _save(engine, Path(job["save"]), step)
        result["after"] = _steps(engine, step, job["steps"], rank, world)
        if rank == 0:
            torch.save(result, job["result"])
    finally:
        dist.destroy_process_group()


def _wait_for(marker: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker} did not appear in {timeout_s:.0f} s")
        time.sleep(0.2)


def run_jobs(jobs: list[tuple[int, dict]]) -> list[dict]:
    """Start every job at once (a job that loads a checkpoint waits for it), wait for all; rank 0's results.
    A failed process stops the others."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(target=worker, args=(rank, world, port, job))
        for world, job in jobs
        for port in [free_port()]
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes):
            if any(p.exitcode not in (None, 0) for p in processes):
                raise RuntimeError(f"a reshard worker failed (exit codes {[p.exitcode for p in processes]})")
            time.sleep(0.2)
        if any(p.exitcode != 0 for p in processes):
            raise RuntimeError(f"a reshard worker failed (exit codes {[p.exitcode for p in processes]})")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return [torch.load(job["result"], weights_only=False) for _, job in jobs]


def scenario(root: Path, steps: int) -> dict:
    """Train at 2 and continue; restore at 1, save, continue; restore that at 2 and continue; and, as the
    baseline, 1 worker trained from the start on the same batches (no reshard at all)."""
    root.mkdir(parents=True, exist_ok=True)
    at2, at1, back = root / "at2", root / "at1", root / "back_at2"
    for folder in (at2, at1, back):
        folder.mkdir(exist_ok=True)
    two, one, two_again, fresh = run_jobs(
        [
            (2, {"save": str(at2), "steps": steps, "result": str(root / "two.pt")}),
            (1, {"load": str(at2), "save": str(at1), "steps": steps, "result": str(root / "one.pt")}),
            (2, {"load": str(at1), "save": str(back), "steps": steps, "result": str(root / "back.pt")}),
            (1, {"steps": steps, "result": str(root / "fresh.pt")}),
        ]
    )
    return {
        "dirs": {"at2": at2, "at1": at1, "back_at2": back},
        "two": two,
        "one": one,
        "back": two_again,
        "fresh": fresh,
    }


def optimizer_folder(checkpoint: Path) -> Path:
    from pipelines.train.loop import DEEPSPEED_DIR, DEEPSPEED_TAG

    return checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG


def moment_errors(before: Path, after: Path) -> dict[str, dict[str, float]]:
    """Per 8-bit-encoded moment after the reshard: the largest |after - before| relative to the absmax of its new
    block, and ||after - before|| / ||before||."""
    from modeling.optim import BLOCK
    from modeling.reshard import ZeroCheckpoint, slice_size

    old, new = ZeroCheckpoint(optimizer_folder(before)), ZeroCheckpoint(optimizer_folder(after))
    errors: dict[str, dict[str, float]] = {}
    for i, (a, b) in enumerate(zip(old.gather(), new.gather())):
        size = slice_size(new.numel(i), new.world)
        for key in sorted(b.eight_bit):
            was, now = a.states[key], b.states[key]
            blocks = torch.nn.functional.pad(was, (0, size * new.world - was.numel())).view(new.world, size)
            blocks = torch.nn.functional.pad(blocks, (0, -size % BLOCK)).view(new.world, -1, BLOCK)
            absmax = blocks.abs().amax(-1, keepdim=True).expand_as(blocks).reshape(new.world, -1)[:, :size]
            scale = absmax.flatten()[: was.numel()].clamp_min(1e-30)
            errors[f"group{i}.{key}"] = {
                "max_vs_block_absmax": ((now - was).abs() / scale).max().item(),
                "norm_relative": ((now - was).norm() / was.norm()).item(),
            }
    return errors


def drift(a: list[dict], b: list[dict], start: dict) -> dict[str, float]:
    """How far two continuations' weights are apart after their first and last step: the largest difference,
    and the distance relative to how far the first one moved from ``start``."""

    def flat(weights: dict) -> torch.Tensor:
        return torch.cat([w.flatten() for w in weights.values()])

    first, last = flat(a[-1]["weights"]), flat(b[-1]["weights"])
    return {
        "max_1_step": (flat(a[0]["weights"]) - flat(b[0]["weights"])).abs().max().item(),
        "max_n_steps": (first - last).abs().max().item(),
        "relative_to_distance_moved_n_steps": ((first - last).norm() / (first - flat(start)).norm()).item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="faceforge-reshard-") as tmp:
        s = scenario(Path(args.out or tmp), args.steps)
        d = s["dirs"]
        two, one, back, fresh = s["two"], s["one"], s["back"], s["fresh"]
        result = {
            "steps": args.steps,
            "lr": LR,
            "2->1": {
                "moments": moment_errors(d["at2"], d["at1"]),
                "weights": drift(two["after"], one["after"], two["trained"][-1]["weights"]),
            },
            "1->2": {
                "moments": moment_errors(d["at1"], d["back_at2"]),
                "weights": drift(one["after"], back["after"], one["loaded"]),
            },
            # no reshard: 1 worker from the start against 2, over the same steps after the save
            "1_vs_2_workers_from_the_start": drift(two["after"], fresh["after"], two["trained"][-1]["weights"]),
        }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
