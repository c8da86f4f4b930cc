"""Time one optimizer step of a faceforge model against a peer implementation of the same size.

    python -m bench.train_step --model mmface-dit-xl                       # H100: bf16, batch 32
    python -m bench.train_step --model mmface-dit-xl --device cpu --depth 2 --batch 2

Prints progress on stderr and ONE JSON line last on stdout:
{"model", "device", "batch", "depth", "samples_per_s", "mfu", "peak_gib", "peer", "peer_samples_per_s",
"speedup_vs_peer", "flops_per_sample", "infer_images_per_s", "optimizer", "peer_optimizer", ...}.
MFU counts the FLOPs of one step (forward + backward, ``torch.utils.flop_counter``) against
989 TFLOP/s (H100 dense bf16); it is null on CPU. Peak memory: CUDA max allocated during our
steps; on CPU the growth of peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):
    # run as a script (python bench/train_step.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cases import CASE_MODULES, OPTIMIZERS, Case  # noqa: E402

H100_BF16_FLOPS = 989e12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="micro-batch (default: the case's DEFAULT_BATCH, e.g. MMFace-DiT 32 on CUDA and 2 on CPU, Face-MoGLE 1)",
    )
    parser.add_argument("--depth", type=int, default=None, help="number of blocks (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--infer-batch", type=int, default=None, help="images per sampling run")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-sample", action="store_true", help="skip the inference measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default="faceforge",
        help="AdamW8bit for our model: faceforge's (the trainer's; chunked CPU update) or stock bitsandbytes. "
        "The peer always runs stock bitsandbytes, as its users would",
    )
    return parser.parse_args(argv)


def find_case_module(model: str):
    known = []
    for name in CASE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        if model in module.MODELS:
            return module
        known.extend(module.MODELS)
    raise SystemExit(f"no benchmark case for model {model!r}; known: {', '.join(known)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def time_calls(fn: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call after ``warmup`` untimed calls; one sync at each end, none in between."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def time_interleaved(fns: list[Callable[[], object]], steps: int) -> list[float]:
    """CPU: median seconds per call of each fn, calls alternating so that load from other processes
    on a shared machine hits every contender alike (a sequential mean would blame one of them)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict:
    def log(msg: str) -> None:
        print(f"[bench {case.name}] {msg}", file=sys.stderr, flush=True)

    peer_samples_per_s = peer_peak = None
    if device.type == "cpu":
        rss_before = _rss_gib()
        for _ in range(max(args.warmup, 1)):  # builds the model and the optimizer state
            case.step()
        peak = _rss_gib() - rss_before
        fns = [case.step]
        if case.peer_step is not None:
            fns.append(case.peer_step)
            for _ in range(max(args.warmup, 1)):
                case.peer_step()
        timings = time_interleaved(fns, args.steps)
        seconds = timings[0]
        if case.peer_step is not None:
            peer_samples_per_s = case.batch / timings[1]
            log(f"peer {case.peer_name}: {timings[1] * 1e3:.1f} ms/step, {peer_samples_per_s:.2f} samples/s")
    else:
        torch.cuda.reset_peak_memory_stats(device)
        seconds = time_calls(case.step, args.warmup, args.steps, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    samples_per_s = case.batch / seconds
    log(f"ours: {seconds * 1e3:.1f} ms/step, {samples_per_s:.2f} samples/s, peak {peak:.2f} GiB")
    flops = count_flops(case.step)
    flops_per_sample = flops / case.batch
    mfu = samples_per_s * flops_per_sample / H100_BF16_FLOPS if device.type == "cuda" else None

    infer_images_per_s = None
    if case.sample is not None:
        if device.type == "cuda":
            case.sample()  # warm-up: kernel selection, allocator; on CPU the first run is representative
        _sync(device)
        start = time.perf_counter()
        images = case.sample()
        _sync(device)
        infer_images_per_s = images / (time.perf_counter() - start)
        log(f"inference: {infer_images_per_s:.3f} images/s")

    if device.type == "cuda" and case.peer_step is not None:
        # free our model before the peer is built: the two never share accelerator memory
        case.step = case.sample = None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            peer_seconds = time_calls(case.peer_step, args.warmup, args.steps, device)
            peer_samples_per_s = case.batch / peer_seconds
            peer_peak = torch.cuda.max_memory_allocated(device) / 2**30
            log(f"peer {case.peer_name}: {peer_seconds * 1e3:.1f} ms/step, {peer_samples_per_s:.2f} samples/s")
        except torch.OutOfMemoryError:
            log(f"peer {case.peer_name}: out of memory at batch {case.batch}")

    return {
        "model": case.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": case.batch,
        "depth": case.depth,
        "samples_per_s": round(samples_per_s, 4),
        "mfu": None if mfu is None else round(mfu, 4),
        "peak_gib": round(peak, 3),
        "peer": case.peer_name,
        "peer_samples_per_s": None if peer_samples_per_s is None else round(peer_samples_per_s, 4),
        "speedup_vs_peer": None if not peer_samples_per_s else round(samples_per_s / peer_samples_per_s, 3),
        "peer_peak_gib": None if peer_peak is None else round(peer_peak, 3),
        "flops_per_sample": flops_per_sample,
        "infer_images_per_s": None if infer_images_per_s is None else round(infer_images_per_s, 4),
        "optimizer": OPTIMIZERS[args.optimizer],
        "peer_optimizer": None if case.peer_step is None else OPTIMIZERS["bitsandbytes"],
        "threads": torch.get_num_threads(),
        **case.extra,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    module = find_case_module(args.model)
    if args.batch is None:
        args.batch = module.DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda":
        # cuDNN attention is slower than flash for these shapes and breaks on some masks
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    case = module.build(args, device)
    result = measure(case, args, device)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
