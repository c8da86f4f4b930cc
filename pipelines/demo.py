"""``faceforge demo`` (``make demo``): the whole system end to end on this machine.

Synthetic faces -> Ray Data precompute -> MMFace-DiT training (2 Ray Train workers, DeepSpeed ZeRO-2,
bitsandbytes AdamW8bit, EMA) -> the two-stage Face-MoGLE (tiny FLUX base, then LoRA + MoGLE) -> MLflow
registry -> faces generated from held-out masks and captions by the published checkpoints.
Every stage resumes: a second ``make demo`` reuses what the first one finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _say(message: str) -> None:
    print(f"\n[faceforge demo] {message}", flush=True)


def _train_once(config_name: str, overrides: list[str], run_dir: Path, steps: int) -> Path:
    """Trains unless this run already reached ``steps``; returns the run's latest checkpoint."""
    from modeling.checkpoints import latest_checkpoint
    from pipelines.train.config import load_config
    from pipelines.train.run import train

    try:
        done = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())["step"] >= steps
    except FileNotFoundError:
        done = False
    if done:
        _say(f"{run_dir.name}: already trained to {steps} steps, reusing it")
    else:
        train(load_config(CONFIGS / config_name, overrides))
    return latest_checkpoint(run_dir)


def run_demo(workdir: Path, n: int = 192, steps: int = 60) -> int:
    from PIL import Image

    from modeling.generator import FaceGenerator, GenerationRequest
    from pipelines.data.prepare import PrepareOptions, load_manifest, prepare
    from pipelines.data.readers import open_reader
    from pipelines.data.synth import synthesize
    from pipelines.train.publish import publish

    workdir = workdir.resolve()
    synth, prepared, runs = workdir / "synth", workdir / "prepared", workdir / "runs"

    _say(f"1/5 drawing {n} synthetic faces with known attributes -> {synth}")
    synthesize(synth, n=n, size=64, seed=0)

    _say(f"2/5 precomputing latents + MiniLM text embeddings with Ray Data -> {prepared}")
    prepare(PrepareOptions(layout="celebamask-hq", root=str(synth), out=str(prepared), size=64, rows_per_shard=64))
    counts = load_manifest(prepared)["counts"]
    print(f"  {counts['n_written']} rows written, {counts['n_rejected']} rejected")

    common = [f"data={prepared}", f"storage={runs}", f"max_steps={steps}", f"ckpt_every={max(1, steps // 2)}"]
    _say("3/5 training MMFace-DiT (tiny) on 2 Ray Train workers: DeepSpeed ZeRO-2 + AdamW8bit + EMA")
    mmface = _train_once("mmface_dit_tiny.yaml", common, runs / "mmface-dit-tiny", steps)
    _say("4/5 training Face-MoGLE: the tiny FLUX base in full, then condition LoRA + MoGLE on top of it")
    _train_once("flux_base_tiny.yaml", common, runs / "flux-base-tiny", steps)
    mogle = _train_once(
        "face_mogle_tiny.yaml", [*common, f"base_from={runs / 'flux-base-tiny'}"], runs / "face-mogle-tiny", steps
    )

    _say("5/5 publishing both to the MLflow registry and generating faces from held-out conditions")
    for run in ("mmface-dit-tiny", "face-mogle-tiny"):
        print("  " + json.dumps(publish(run, storage=str(runs))))
    reader = open_reader("celebamask-hq", synth)
    held_out = [i for i in reader.ids() if reader.split_of(i) == "test"][:4]
    records = [reader.read(i) for i in held_out]
    from modeling.conditions import labels_to_color, resize_image, resize_labels

    out_dir = workdir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, checkpoint in (("mmface-dit-tiny", mmface), ("face-mogle-tiny", mogle)):
        generator = FaceGenerator(checkpoint)
        requests = [GenerationRequest(prompt=r.captions[0], mask=r.label_map, seed=k) for k, r in enumerate(records)]
        images = generator.generate(requests)
        rows = [
            np.concatenate([labels_to_color(resize_labels(r.label_map, 64)), image, resize_image(r.image, 64)], axis=1)
            for r, image in zip(records, images)
        ]
        path = out_dir / f"{name}.png"
        Image.fromarray(np.concatenate(rows, axis=0)).resize((3 * 128, 128 * len(rows)), Image.NEAREST).save(path)
        print(f"  {name}: mask | generated | real, for prompts:")
        for r in records:
            print(f"    - {r.captions[0]}")
        print(f"    -> {path}")
    _say(
        "done. Browse the runs, metrics and sample grids with:\n"
        "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1"
    )
    return 0
