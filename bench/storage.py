"""Checkpoints and shards on local disk vs an S3 API server, and what a checkpoint weighs at paper size.

    python bench/storage.py [--repeats 3] [--shard-mb 64]

Starts a moto S3 server on loopback (``pip install 'moto[server]'``, the dev extra) and measures, in one run:

- checkpoint save and restore of the tiny presets through the run folder's storage layer: save = the rank's
  files (model + optimizer state, serving weights, EMA) staged in a local temp folder, copied into the run
  folder and certified by its manifest; restore = discovery of the newest intact checkpoint with every sha256
  checked, the copy back into a local folder and ``torch.load``. Local disk vs the S3 server.
- bytes per checkpoint of the paper presets and of Face-MoGLE's trainable state, from parameter counts on the
  meta device (bf16 module weights, fp32 master weights, 8-bit AdamW state, fp32 serving weights and EMA).
- Ray Data read throughput of the same Parquet shards from disk vs from the S3 server.

Progress goes to stderr; one JSON line on stdout at the end. Loopback S3 measures the storage layer's own
overhead (requests, checksums, copies), not a network: a real bucket adds its latency and bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = "faceforge-bench"


def say(message: str) -> None:
    print(f"[bench/storage] {message}", file=sys.stderr, flush=True)


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")  # moto accepts an unsigned CreateBucket
    urllib.request.urlopen(request, timeout=10).read()
    return server, endpoint


# ------------------------------------------------------------------------------------------- checkpoints


def stage_checkpoint(preset: str, folder: Path, step: int) -> list[dict]:
    """What one rank stages for a checkpoint of ``preset`` (a single rank holds the whole state here)."""
    import torch
    from safetensors.torch import save_file

    from modeling.checkpoints import MANIFEST_FORMAT, STATE_FILE, file_records
    from modeling.optim import AdamW8bit

    torch.manual_seed(0)
    if preset.startswith("face-mogle"):
        from modeling.face_mogle import build_model
    else:
        from modeling.mmface_dit import build as build_model
    model = build_model(preset)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW8bit(params, lr=1e-4)
    loss = sum(p.float().square().mean() for p in params)
    loss.backward()
    optimizer.step()  # the optimizer state exists only after a step
    (folder / "deepspeed" / "state").mkdir(parents=True)
    torch.save(model.state_dict(), folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    torch.save(optimizer.state_dict(), folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    trainable = {n: p.detach().float().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    (folder / "weights").mkdir()
    save_file(trainable, folder / "weights" / "model.safetensors")
    save_file(trainable, folder / "weights" / "ema.safetensors")
    state = {"step": step, "epoch": 1, "ema_updates": step, "world": 1, "manifest": MANIFEST_FORMAT}
    (folder / STATE_FILE).write_text(json.dumps(state))
    return file_records(folder)


def time_checkpoints(preset: str, runs: str, repeats: int) -> dict:
    import torch

    from modeling import storage
    from modeling.checkpoints import checkpoint_name, newest_complete, write_manifest

    run_dir = storage.location(runs) / preset
    storage.delete(run_dir)
    saves, restores, size = [], [], 0
    for step in range(1, repeats + 1):
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
            records = stage_checkpoint(preset, Path(tmp) / "staged", step)
            size = sum(r["size"] for r in records)
            started = time.perf_counter()
            target = run_dir / checkpoint_name(step)
            storage.upload_dir(Path(tmp) / "staged", target)
            write_manifest(target, records)
            saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        found = newest_complete(run_dir, deep=True)
        with storage.local_folder(found) as local:
            torch.load(local / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=True)
            torch.load(local / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
        restores.append(time.perf_counter() - started)
    storage.delete(run_dir)
    return {"bytes": size, "save_s": round(min(saves), 3), "restore_s": round(min(restores), 3)}


def checkpoint_bytes(preset: str) -> dict:
    """Bytes of one checkpoint (all ranks together) from parameter counts: bf16 module weights as DeepSpeed saves
    them (frozen ones included), fp32 master weights + 8-bit AdamW state (two uint8 moments + one fp32 absmax per
    256-value block) of the trainable ones, and the fp32 serving weights and EMA of the trainable ones."""
    from modeling.presets import describe

    info = describe(preset)
    total, trainable = info["params"], info["trainable"]
    parts = {
        "module_bf16": 2 * total,
        "master_fp32": 4 * trainable,
        "adamw8bit_state": int(trainable * (2 + 2 * 4 / 256)),
        "serving_weights_fp32": 4 * trainable,
        "ema_fp32": 4 * trainable,
    }
    parts["total"] = sum(parts.values())
    parts["total_without_frozen_module"] = parts["total"] - 2 * (total - trainable)
    return {"params": total, "trainable": trainable, **parts}


# -------------------------------------------------------------------------------------------- Ray Data


def write_shards(where: str, n_shards: int, shard_mb: int) -> list[str]:
    """Parquet shards of incompressible binary rows (latent-sized), zstd as prepare writes them."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modeling import storage

    rng = np.random.default_rng(0)
    row_bytes = 64 * 1024
    rows = shard_mb * 2**20 // row_bytes
    paths = []
    for k in range(n_shards):
        table = pa.table({"id": [f"{k}-{i}" for i in range(rows)],
                          "image_latent": [rng.bytes(row_bytes) for _ in range(rows)]})  # fmt: skip
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        target = storage.location(where) / f"shard-{k:03d}.parquet"
        storage.write_bytes(target, buffer.getvalue())
        paths.append(target)
    return paths


def read_throughput(paths, repeats: int) -> dict:
    import ray

    best = float("inf")
    total = 0
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        dataset = ray.data.read_parquet([p.path for p in paths], filesystem=paths[0].fs)
        for batch in dataset.iter_batches(batch_size=64, batch_format="pyarrow"):
            total += batch.nbytes
        best = min(best, time.perf_counter() - started)
    return {"mb": round(total / 2**20, 1), "seconds": round(best, 3), "mb_per_s": round(total / 2**20 / best, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each timing")
    parser.add_argument("--shard-mb", type=int, default=16, help="size of each of the 4 Parquet shards")
    args = parser.parse_args()

    server, endpoint = start_s3()
    result: dict = {"s3_endpoint": "moto on loopback", "cpus": os.cpu_count()}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
            result["checkpoint"] = {}
            for preset in ("mmface-dit-tiny", "face-mogle-tiny"):
                result["checkpoint"][preset] = {}
                for where, runs in (("local", str(Path(tmp) / "runs")), ("s3", f"s3://{BUCKET}/runs")):
                    say(f"checkpoint save/restore: {preset} on {where}")
                    result["checkpoint"][preset][where] = time_checkpoints(preset, runs, args.repeats)
            say("bytes per checkpoint at paper size (meta device)")
            result["checkpoint_bytes"] = {p: checkpoint_bytes(p) for p in ("mmface-dit-xl", "face-mogle-flux-dev")}

            from pipelines.ray_runtime import ensure_ray, stop_ray

            ensure_ray()
            try:
                result["ray_data_read"] = {}
                for where, folder in (("local", str(Path(tmp) / "shards")), ("s3", f"s3://{BUCKET}/shards")):
                    say(f"Ray Data read: shards on {where}")
                    paths = write_shards(folder, 4, args.shard_mb)
                    result["ray_data_read"][where] = read_throughput(paths, args.repeats)
            finally:
                stop_ray()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
