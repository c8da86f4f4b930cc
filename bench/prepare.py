"""Precompute throughput and bytes per row.

    python bench/prepare.py [--n 256] [--size 64]

Measures images/s of ``faceforge data prepare`` on this machine with the embedded codec and MiniLM (a
fresh synthetic set, local Ray), the stored bytes per row of that run (Parquet, zstd), and computes the
raw bytes per row of the paper configurations from the field shapes and dtypes ``prepare`` writes.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F16, U8 = 2, 1


def paper_row_bytes(size: int, targets: tuple[str, ...], text: str, captions: int = 10, t5_tokens: int = 40) -> dict:
    """Raw bytes of one row: FLUX VAE (16 ch, /8) latents in fp16 + the text fields of ``text``."""
    latent = 16 * (size // 8) ** 2 * F16
    parts = {"mask_labels": size * size * U8, "image_latent": latent}
    if "mmface" in targets:
        parts["mask_latent"] = parts["sketch_latent"] = latent
    if "mogle" in targets:
        parts["cond_latents"] = 20 * latent
    if text == "clip-h":  # SD-2.1 conditioning keeps all 77 positions
        parts["text_seq"] = captions * 77 * 1024 * F16
        parts["text_mask"] = captions * 77 * U8
        parts["text_pooled"] = captions * 1024 * F16
    else:  # T5-XXL trimmed to the row's longest caption (~40 tokens on MM-CelebA-HQ) + CLIP-L pooled
        parts["text_seq"] = captions * t5_tokens * 4096 * F16
        parts["text_mask"] = captions * t5_tokens * U8
        parts["text_pooled"] = captions * 768 * F16
    return {"total": sum(parts.values()), **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="synthetic faces to prepare")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from pipelines.data.prepare import PrepareOptions, load_manifest, prepare
    from pipelines.data.synth import synthesize
    from pipelines.ray_runtime import ensure_ray

    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "synth", Path(tmp) / "prepared"
        synthesize(root, n=args.n, size=max(args.size, 64), seed=0)
        ensure_ray()
        options = PrepareOptions(layout="celebamask-hq", root=str(root), out=str(out), size=args.size)
        start = time.perf_counter()
        prepare(options, progress=False)
        seconds = time.perf_counter() - start
        manifest = load_manifest(out)
        written = manifest["counts"]["n_written"]
        stored = sum((out / "shards" / s["file"]).stat().st_size for s in manifest["shards"])

    paper = {
        "mmface_flux_vae_256_clip_h": paper_row_bytes(256, ("mmface",), "clip-h"),
        "mmface_flux_vae_512_clip_h": paper_row_bytes(512, ("mmface",), "clip-h"),
        "mogle_flux_vae_512_t5_xxl": paper_row_bytes(512, ("mogle",), "t5"),
        "mogle_flux_vae_256_t5_xxl": paper_row_bytes(256, ("mogle",), "t5"),
    }
    for name, parts in paper.items():
        mib, gib = parts["total"] / 2**20, parts["total"] * 3e4 / 2**30
        print(f"{name:30s} {mib:8.2f} MiB/row  x 30,000 rows = {gib:7.1f} GiB")
    result = {
        "bench": "prepare",
        "images": written,
        "seconds": round(seconds, 2),
        "images_per_s": round(written / seconds, 2),
        "size": args.size,
        "embedded_stored_bytes_per_row": stored // max(written, 1),
        "paper_raw_bytes_per_row": {k: v["total"] for k, v in paper.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
