"""Overhead of the full Ray path (Ray Data -> Ray Train -> DeepSpeed -> EMA -> MLflow) over a bare loop.

    python bench/train_ray.py [--config configs/mmface_dit_tiny.yaml] [--batch 8] [--steps 60] [--gpu]

Both sides train the same model at the same per-worker batch with the trainer's AdamW8bit:
the Ray side through ``faceforge train`` with one worker (its own ``train/samples_per_s`` and
``train/data_wait_frac`` over the last logging window), the bare side as a plain PyTorch loop over
batches already collated in memory (no data loading, no DeepSpeed, no EMA, no logging). Prints one JSON
line last: ``ray_samples_per_s``, ``bare_samples_per_s``, ``overhead`` (1 - ray/bare), ``data_wait_frac``.
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


def bare_loop(config, manifest: dict, batch: int, steps: int, device: str) -> float:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipelines.train.loop import make_optimizer
    from pipelines.train.task import NullText
    from pipelines.train.tasks import make_task

    task = make_task(config, manifest)
    shard = Path(config.data.path) / "shards" / next(s["file"] for s in manifest["shards"] if s["split"] == "train")
    rows = pq.read_table(shard, columns=task.columns).slice(0, batch).to_pydict()
    null = NullText.load(config.data.path).as_batch(device, torch.float32)
    data = task.collate(rows, np.random.default_rng(0)) | null
    data = {k: v.to(device) for k, v in data.items()}
    torch.manual_seed(0)
    model = task.build_model(device)
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        loss = task.loss(model, data, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mmface_dit_tiny.yaml")
    parser.add_argument("--data", help="a prepared folder (default: 256 synthetic faces prepared now)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import torch

    from pipelines.data.prepare import PrepareOptions, load_manifest, prepare
    from pipelines.data.synth import synthesize
    from pipelines.ray_runtime import ensure_ray
    from pipelines.train.config import load_config
    from pipelines.train.run import train

    tmp = Path(tempfile.mkdtemp(prefix="faceforge-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    ensure_ray()
    data = args.data
    if not data:
        synthesize(tmp / "synth", n=256, size=64, seed=0)
        data = str(tmp / "prepared")
        prepare(PrepareOptions(layout="celebamask-hq", root=str(tmp / "synth"), out=data), progress=False)
    threads = 1 if not args.gpu else max(1, torch.get_num_threads())
    window = max(1, args.steps // 3)
    overrides = [
        f"data={data}", f"storage={tmp / 'runs'}", "name=bench", f"batch={args.batch}", f"max_steps={args.steps}",
        f"ckpt_every={args.steps}", f"log_every={window}", "workers=1", f"gpu={str(args.gpu).lower()}",
        f"scaling.cpus_per_worker={threads}", "logging.sample_every=0", "ema=true",
    ]  # fmt: skip
    config = load_config(args.config, overrides)
    summary = train(config)
    ray_rate = summary["metrics"].get("train/samples_per_s")
    wait = summary["metrics"].get("train/data_wait_frac")

    torch.set_num_threads(threads)
    bare_rate = bare_loop(config, load_manifest(data), args.batch, args.steps, "cuda" if args.gpu else "cpu")
    result = {
        "bench": "train_ray",
        "config": args.config,
        "device": "cuda" if args.gpu else "cpu",
        "batch": args.batch,
        "steps": args.steps,
        "threads": threads,
        "ray_samples_per_s": round(ray_rate, 3) if ray_rate else None,
        "bare_samples_per_s": round(bare_rate, 3),
        "overhead": round(1 - ray_rate / bare_rate, 4) if ray_rate else None,
        "data_wait_frac": round(wait, 4) if wait is not None else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
