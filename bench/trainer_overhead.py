"""Where the trainer's time goes: the full trainer against the same training step run barer, on the same cores.

    python bench/trainer_overhead.py [--configs configs/mmface_dit_tiny.yaml configs/flux_base_tiny.yaml]
                                     [--data PREPARED] [--steps 60] [--gpu]

For each config, in one run, with the config's workers, per-worker batch, threads, dtype and optimizer:

  (a) bare       plain PyTorch data parallel: one process per worker (gloo / NCCL), the gradients averaged in
                 one flat all-reduce, AdamW8bit, gradient clipping, the same loss and autocast, batches already
                 collated in memory;
  (b) deepspeed  the same processes and batches with the DeepSpeed engine instead (the run's ZeRO stage);
  (c) ray_data   (b) inside Ray Train workers, fed by Ray Data through the task's collate (no EMA, MLflow,
                 progress or checkpoints);
  (d) trainer    ``faceforge train`` itself: Ray Train + DeepSpeed + Ray Data + EMA + MLflow + progress +
                 checkpoints. Its samples/s is the trainer's own ``train/samples_per_s`` over its last logging
                 window; its per-step breakdown (``time/*_ms``) and its time to first step (``startup/*_s``,
                 from the moment ``train`` was called) come from the metrics the trainer logs itself.

Progress goes to stderr; ONE JSON line is printed last on stdout: per config ``bare_samples_per_s``,
``trainer_samples_per_s``, ``ratio`` (trainer / bare), the (b) and (c) figures, ``first_step_s`` and
``breakdown``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.train.reference import WARMUP, reference_samples_per_s  # noqa: E402


def say(message: str) -> None:
    print(f"[trainer_overhead] {message}", file=sys.stderr, flush=True)


def _ray_loop(loop_config: dict) -> None:
    """(c): the DeepSpeed step of (b) inside a Ray Train worker, batches from its Ray Data shard (or, for the
    ``ray_train`` variant, the in-memory batches of (b): Ray Train's share of the difference)."""
    import numpy as np
    import ray.train
    import torch.distributed as dist

    from pipelines.train.config import config_from_dict
    from pipelines.train.loop import _to, shard_batches
    from pipelines.train.reference import in_memory_batches, setup, step_fn

    config = config_from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    task, model, device, dtype, null = setup(config, loop_config["manifest"], rank)
    step = step_fn("deepspeed", config, task, model, device)
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng([config.run.seed, rank])

    def batches():
        while True:
            yield from shard_batches(shard, config, rng, task.collate)

    if loop_config["feed"] == "memory":
        kept = in_memory_batches(task, config, loop_config["manifest"], rank, world)
        stream = (kept[i % len(kept)] for i in range(10**9))
    else:
        stream = batches()
    take = lambda: {k: _to(v, device, dtype) for k, v in next(stream).items()} | null  # noqa: E731
    for _ in range(WARMUP):
        step(take())
    dist.barrier()
    start = time.perf_counter()
    steps = loop_config["steps"]
    for _ in range(steps):
        step(take())
    dist.barrier()
    if rank == 0:  # this bench runs on one machine: the driver reads the figure from a file
        rate = config.data.batch_size * world * steps / (time.perf_counter() - start)
        Path(loop_config["out"]).write_text(json.dumps(rate))


def run_in_ray_train(config, manifest: dict, steps: int, storage: Path, feed: str) -> float:
    from ray.train import RunConfig

    from pipelines.train.run import build_trainer, leave_cpu_headroom

    leave_cpu_headroom(config)
    out = storage / f"{config.run.name}-{feed}.json"
    trainer = build_trainer(config, manifest, {"steps": steps, "out": str(out), "feed": feed})
    trainer.train_loop_per_worker = _ray_loop  # the same trainer, datasets and scaling; a bare loop
    trainer.run_config = RunConfig(name=f"{config.run.name}-{feed}", storage_path=str(storage))
    trainer.fit()
    return json.loads(out.read_text())


class CpuWatch:
    """CPU seconds each process of this machine's Ray (and this driver) spends while the trainer is in its steady
    state (between two steps read from the run's progress file): where the cores go besides the two workers."""

    def __init__(self, progress: Path, first: int, last: int) -> None:
        import threading

        self.progress, self.first, self.last = progress, first, last
        self.result: dict = {}
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    @staticmethod
    def _snapshot() -> dict:
        import psutil

        me = psutil.Process()
        seen = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                name = " ".join(proc.cmdline()[:1]) if not proc.name().startswith("ray::") else proc.name()
                seen[proc.pid] = (name.split("/")[-1][:60], times.user + times.system)
            except psutil.Error:
                continue
        return seen

    def _step(self) -> int:
        try:
            return json.loads(self.progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            return -1

    def _watch(self) -> None:
        while self._step() < self.first:
            time.sleep(0.2)
        before, t0 = self._snapshot(), time.perf_counter()
        while 0 <= self._step() < self.last:
            time.sleep(0.2)
        after, wall = self._snapshot(), time.perf_counter() - t0
        usage: dict[str, float] = {}
        for pid, (name, cpu) in after.items():
            if pid in before:
                usage[name] = usage.get(name, 0.0) + (cpu - before[pid][1]) / wall
        self.result = {"wall_s": round(wall, 1), "cores_by_process": dict(sorted(
            ((k, round(v, 3)) for k, v in usage.items() if v >= 0.005), key=lambda kv: -kv[1]))}  # fmt: skip


def run_trainer(config, steps: int) -> tuple[dict, dict]:
    from mlflow import MlflowClient

    from pipelines.train.run import train
    from serve.settings import tracking_uri

    run_dir = Path(config.run.storage).resolve() / config.run.name
    watch = CpuWatch(run_dir / "progress.json", steps + 1, 2 * steps - 1)
    summary = train(config)
    watch.thread.join(timeout=5)
    # the latest value of every metric the run logged (the final window's breakdown, the first window's startup)
    return MlflowClient(tracking_uri()).get_run(summary["mlflow_run_id"]).data.metrics, watch.result


def bench_config(path: str, data: str, steps: int, gpu: bool, tmp: Path, modes: list[str]) -> dict:
    from pipelines.data.prepare import load_manifest
    from pipelines.train.config import load_config

    name = Path(path).stem
    total = 2 * steps  # the trainer logs two windows: the first holds its start, the second is measured
    overrides = [
        f"data={data}", f"storage={tmp / 'runs'}", f"name={name}-bench", f"max_steps={total}",
        f"ckpt_every={total}", f"log_every={steps}", f"gpu={str(gpu).lower()}", "logging.sample_every=0",
    ]  # fmt: skip
    if gpu:
        overrides.append("workers=1")
    config = load_config(path, overrides)
    if config.model.arch == "face-mogle" and config.model.mode == "lora":
        raise SystemExit(f"{path}: a lora-mode config needs a trained base; bench its full-mode base instead")
    manifest = load_manifest(data)
    result: dict = {"config": path, "workers": config.scaling.num_workers, "batch": config.data.batch_size}
    if "bare" in modes:
        say(f"{name}: (a) bare data-parallel loop, {steps} steps")
        result["bare_samples_per_s"] = round(reference_samples_per_s(config, manifest, steps, "bare"), 2)
        say(f"{name}: bare {result['bare_samples_per_s']} samples/s")
    if "deepspeed" in modes:
        say(f"{name}: (b) DeepSpeed loop")
        result["deepspeed_samples_per_s"] = round(reference_samples_per_s(config, manifest, steps, "deepspeed"), 2)
        say(f"{name}: deepspeed {result['deepspeed_samples_per_s']} samples/s")
    if "ray_train" in modes:
        say(f"{name}: (c0) Ray Train + DeepSpeed loop, batches in memory")
        rate = run_in_ray_train(load_config(path, overrides), manifest, steps, tmp, "memory")
        result["ray_train_samples_per_s"] = round(rate, 2)
        say(f"{name}: ray_train {result['ray_train_samples_per_s']} samples/s")
    if "ray_data" in modes:
        say(f"{name}: (c) Ray Train + Ray Data + DeepSpeed loop")
        rate = run_in_ray_train(load_config(path, overrides), manifest, steps, tmp, "ray_data")
        result["ray_data_samples_per_s"] = round(rate, 2)
        say(f"{name}: ray_data {result['ray_data_samples_per_s']} samples/s")
    if "trainer" in modes:
        say(f"{name}: (d) faceforge train")
        metrics, cpu = run_trainer(load_config(path, overrides), steps)
        result["cpu_during_steady_state"] = cpu
        result["trainer_samples_per_s"] = round(metrics["train/samples_per_s"], 2)
        result["data_wait_frac"] = round(metrics.get("train/data_wait_frac", float("nan")), 4)
        result["breakdown_ms"] = {k[5:-3]: round(v, 2) for k, v in metrics.items() if k.startswith("time/")}
        startup = {k[8:-2]: round(v, 2) for k, v in metrics.items() if k.startswith("startup/")}
        result["first_step_s"] = startup.pop("first_step", None)
        result["startup_s"] = startup
    bare = result.get("bare_samples_per_s")
    for key in ("deepspeed", "ray_train", "ray_data", "trainer"):
        if bare and f"{key}_samples_per_s" in result:
            result[f"{key}_ratio"] = round(result[f"{key}_samples_per_s"] / bare, 3)
    result["ratio"] = result.get("trainer_ratio")
    say(f"{name}: {json.dumps(result)}")
    return result


def prepare_default(tmp: Path) -> str:
    from pipelines.data.prepare import prepare
    from pipelines.data.synth import synthesize
    from pipelines.demo import DemoPlan

    plan = DemoPlan()
    say(f"preparing {plan.n} synthetic faces as the demo does")
    synthesize(tmp / "synth", n=plan.n, size=plan.size, seed=0)
    prepare(plan.prepare_options(tmp / "synth", tmp / "prepared"), progress=False)
    return str(tmp / "prepared")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/mmface_dit_tiny.yaml", "configs/flux_base_tiny.yaml"])
    parser.add_argument("--data", help="a prepared folder (default: the demo's synthetic faces, prepared now)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (after 5 warm-up steps)")
    parser.add_argument("--modes", nargs="+", default=["bare", "deepspeed", "ray_train", "ray_data", "trainer"])
    parser.add_argument("--gpu", action="store_true", help="one GPU worker (the lent machine)")
    args = parser.parse_args()

    import torch

    from pipelines.ray_runtime import ensure_ray

    if args.gpu:
        torch.backends.cuda.enable_cudnn_sdp(False)
    tmp = Path(tempfile.mkdtemp(prefix="faceforge-overhead-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
    data = str(Path(args.data).resolve()) if args.data else prepare_default(tmp)  # workers run in another cwd
    ensure_ray(log_to_driver=False)  # the workers' output stays in Ray's logs: stdout is for the JSON line
    results = [bench_config(c, data, args.steps, args.gpu, tmp, args.modes) for c in args.configs]
    device = torch.cuda.get_device_name(0) if args.gpu else f"cpu x{os.cpu_count()}"
    print(json.dumps({"bench": "trainer_overhead", "device": device, "steps": args.steps, "configs": results}))


if __name__ == "__main__":
    main()
