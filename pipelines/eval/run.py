"""``faceforge eval RUN --data PREPARED``: the synthetic yardstick of a trained checkpoint, logged to its MLflow run.

The held-out split of a prepared *synthetic* dataset gives the conditions: each face's mask, and a caption that
states all of its colour attributes (``full_caption``). The checkpoint generates one image per face with a fixed
seed (``FaceGenerator``, the same code that serves it); the synthetic parser and the attribute reader score them
(``pipelines.eval.yardstick``). Results go to a JSON file and, under the training run in MLflow, to
``eval/<name>`` metrics (at the checkpoint's step) and ``eval/`` artifacts (the JSON, a mask | generated | real
grid).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modeling.checkpoints import STATE_FILE, resolve_checkpoint, weights_dir
from modeling.conditions import labels_to_color, resize_image
from pipelines.data.prepare import decode_tensor, load_manifest


def held_out(data: str | Path, n: int, split: str = "test") -> tuple[list[str], np.ndarray, list[dict]]:
    """(ids, label maps (n, S, S), attribute rows) of the first ``n`` rows of a synthetic dataset's split."""
    import pyarrow.parquet as pq

    from pipelines.data.synth import attributes_of

    manifest = load_manifest(data)
    attributes_file = Path(manifest["root"]) / "attributes.jsonl"
    if not attributes_file.is_file():
        raise FileNotFoundError(
            f"{attributes_file}: missing; the synthetic yardstick needs a dataset made by `faceforge data synth` "
            "(real datasets are judged by the paper metrics)"
        )
    size = manifest["size"]
    ids, labels = [], []
    for shard in (s for s in manifest["shards"] if s["split"] == split):
        table = pq.read_table(Path(data) / "shards" / shard["file"], columns=["id", "mask_labels"]).to_pydict()
        ids.extend(table["id"])
        labels.extend(decode_tensor(m, "uint8", (size, size)) for m in table["mask_labels"])
        if len(ids) >= n:
            break
    if len(ids) < 2:
        raise ValueError(f"{data}: the '{split}' split has {len(ids)} rows; the yardstick needs at least 2")
    attributes = attributes_of(manifest["root"])
    ids = ids[:n]
    return ids, np.stack(labels[:n]), [attributes[i] for i in ids]


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    parser: str | Path,
    n: int = 64,
    steps: int | None = None,
    guidance: float | None = None,
    batch: int = 16,
    out: str | Path | None = None,
    log_to_mlflow: bool = True,
    progress: Callable[[int, int], None] | None = None,
    text_only: bool = False,
    paper: bool = False,
) -> dict:
    """Scores a checkpoint (or a run folder: its newest complete checkpoint) on the synthetic yardstick.

    ``text_only``: the faces are generated from their captions alone (no mask), and scored by
    ``score_text_only``: how many are faces, and each stated colour read inside the part the parser finds.
    ``paper``: the same images also get the papers' FID, KID, LPIPS, SSIM and MS-SSIM against the real faces
    (``result["paper"]``, MLflow ``eval/paper/...``)."""
    import torch

    from modeling.generator import FaceGenerator, GenerationRequest
    from modeling.judges.synthetic_parser import load_parser
    from pipelines.data.synth import full_caption
    from pipelines.eval.yardstick import score, score_text_only

    checkpoint = resolve_checkpoint(checkpoint)
    ids, labels, attributes = held_out(data, n)  # a dataset without known attributes fails before any loading
    judge = load_parser(parser)
    generator = FaceGenerator(weights_dir(checkpoint))
    prompts = [full_caption(a) for a in attributes]
    started = time.perf_counter()
    images = []
    for start in range(0, len(ids), batch):
        chunk = range(start, min(start + batch, len(ids)))
        requests = [GenerationRequest(prompt=prompts[i], mask=None if text_only else labels[i], seed=i) for i in chunk]
        images.extend(generator.generate(requests, steps=steps, guidance=guidance))
        if progress is not None:
            progress(chunk.stop, len(ids))
    seconds = time.perf_counter() - started
    images = np.stack(images)
    parsed = judge.parse(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    if parsed.shape[1:] != labels.shape[1:]:
        raise ValueError(f"parser size {parsed.shape[1:]} differs from the data's {labels.shape[1:]}")
    result = score_text_only(images, parsed, attributes) if text_only else score(images, labels, parsed, attributes)
    state = json.loads((checkpoint / STATE_FILE).read_text()) if (checkpoint / STATE_FILE).is_file() else {}
    if guidance is None:  # what the generator chose: text alone may guide harder than text with a mask
        guidance = generator.default_guidance(GenerationRequest(prompt="", mask=None if text_only else labels[0]))
    result |= {
        "checkpoint": str(checkpoint),
        "arch": generator.arch,
        "step": state.get("step"),
        "steps": steps or generator.defaults.steps,
        "guidance": guidance,
        "parser": {"path": str(parser), **{k: judge.config.__dict__[k] for k in ("pixel_accuracy", "miou")}},
        "images_per_s": round(len(ids) / seconds, 2),
        "prompts": prompts[:4],
    }
    from pipelines.eval.yardstick import flat_metrics

    reals = [real_image(data, i, labels.shape[1]) for i in ids]
    metrics = flat_metrics(result, "eval/text_only/" if text_only else "eval/")
    if paper:
        from pipelines.eval.paper import score_images

        result["paper"] = score_images(images, np.stack(reals))
        numbers = {k: v for k, v in result["paper"]["metrics"].items() if isinstance(v, float)}
        metrics |= {result["paper"]["mlflow_prefix"] + k: v for k, v in numbers.items()}
    out = Path(out) if out else checkpoint / "eval" / ("yardstick-text.json" if text_only else "yardstick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    grid = out.with_suffix(".png")
    # text-only rows show what the parser found in place of the (unused) mask
    shown = parsed[:8].astype(np.uint8) if text_only else labels[:8]
    save_grid(grid, shown, images[:8], reals[:8])
    result["json"], result["grid"] = str(out), str(grid)
    if log_to_mlflow:
        result["mlflow_run_id"] = log_result(checkpoint, result, [out, grid], metrics=metrics)
    return result


def real_image(data: str | Path, record_id: str, size: int) -> np.ndarray:
    from PIL import Image

    root = Path(load_manifest(data)["root"])
    return resize_image(np.asarray(Image.open(root / "CelebA-HQ-img" / f"{record_id}.jpg").convert("RGB")), size)


def save_grid(path: Path, labels: np.ndarray, generated: np.ndarray, real: list[np.ndarray], scale: int = 4) -> None:
    """Rows of mask | generated | real, enlarged ``scale`` times with nearest neighbours."""
    from PIL import Image

    rows = [np.concatenate([labels_to_color(m), g, r], axis=1) for m, g, r in zip(labels, generated, real)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def log_result(
    checkpoint: Path,
    result: dict,
    files: list[Path],
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
) -> str | None:
    """eval/* metrics at the checkpoint's step and the files as eval/ artifacts, under the training run.
    ``metrics`` defaults to the yardstick's (``flat_metrics(result)``); ``tags`` hold what has no number
    ("skipped: ...")."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from pipelines.eval.yardstick import flat_metrics
    from pipelines.train.run import mlflow_run_of
    from serve.settings import tracking_uri

    try:
        run_id = mlflow_run_of(checkpoint.parent)
    except FileNotFoundError:
        return None  # an imported or copied checkpoint: no training run to log into
    client = MlflowClient(tracking_uri())
    now, step = int(time.time() * 1000), int(result.get("step") or 0)
    metrics = flat_metrics(result) if metrics is None else metrics
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            target = Path(tmp) / path.name
            target.write_bytes(path.read_bytes())
            client.log_artifact(run_id, str(target), "eval")
    return run_id
