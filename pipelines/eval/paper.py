"""``faceforge eval RUN --data PREPARED --metrics paper``: the papers' metrics (SPEC §3) of a checkpoint, on Ray Data.

    read_parquet(the split's shards: id, mask_labels, captions) -> limit(n)
      -> map_batches(attach_conditions): the real image from the dataset root (the manifest's reader), resized to
         the model's size, and for text+sketch its sketch, drawn as prepare drew it
      -> map_batches(Generate, actor pool): ``FaceGenerator``, one fixed seed per face (from its id)
      -> map_batches(Judge, actor pool): ``score_batch``: per-image scores and Inception/CLIP embeddings, as columns
    driver: ``MetricTally`` over every row -> FID, KID and CMMD fitted to the whole set, means of the rest.

Each pool has one actor per GPU when the Ray cluster has GPUs, else one CPU actor. Inception, LPIPS and the BiSeNet
parser ship inside packages (``modeling.judges``); CLIP and DINO only come from ``--judges DIR`` (``DIR/clip``,
``DIR/dino``), and without them their metrics read "skipped: ..." in the JSON and as MLflow tags, never a number.
Values go to the evaluated run in MLflow as ``eval/<task>/<metric>`` at the checkpoint's step, and to a JSON file.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from modeling.checkpoints import STATE_FILE, resolve_checkpoint, weights_dir
from modeling.metrics import SuiteConfig, ms_ssim_plan

# task -> (the caption, the mask, the sketch) given to the generator
TASKS = {
    "text+mask": (True, True, False),
    "mask": (False, True, False),
    "text": (True, False, False),
    "text+sketch": (True, False, True),
}
# Small images keep their pixels: MS-SSIM drops the scales that do not fit instead of upsampling.
SUITE = SuiteConfig(ms_ssim_small="fewer_scales")


@dataclass(frozen=True)
class PaperEvalOptions:
    data: str
    split: str = "test"
    n: int = 64
    task: str = "text+mask"
    judges: str | None = None  # a folder holding clip/ and dino/ (Hugging Face folders)
    steps: int | None = None
    guidance: float | None = None
    batch: int = 8
    out: str | None = None
    log_to_mlflow: bool = True

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task}: choose from {', '.join(TASKS)}")
        if self.n < 2 or self.batch < 1:
            raise ValueError(f"--n {self.n}: FID and KID need at least 2 images (and batch >= 1)")


def mlflow_prefix(task: str) -> str:
    """``eval/text_mask/``: MLflow names allow no "+", so the task's "+" becomes "_"."""
    return f"eval/{task.replace('+', '_')}/"


def seed_of(record_id: str) -> int:
    """A face's sampling seed: fixed by its id alone, so it does not depend on n, batching or order."""
    return zlib.crc32(record_id.encode()) & 0x7FFFFFFF


def attach_conditions(batch: dict, manifest: dict, size: int, task: str) -> dict:
    """Ray Data ``map_batches``: the paired real image (at the generated ``size``), the prompt and the sketch."""
    from modeling.conditions import resize_image
    from pipelines.data.readers import open_reader
    from pipelines.data.transforms import SketchExtractor

    use_text, _, use_sketch = TASKS[task]
    reader = open_reader(manifest["layout"], manifest["root"], **manifest["options"].get("reader_options", {}))
    sketcher = SketchExtractor(manifest["options"].get("sketch_model")) if use_sketch else None
    data_size = manifest["size"]
    real, sketches = [], []
    for record_id in batch["id"]:
        record = reader.read(str(record_id))
        real.append(resize_image(record.image, size))
        if sketcher is not None:  # as prepare made it: the dataset's own sketch, else drawn from the image
            own = record.sketch
            sketches.append(
                resize_image(own, data_size) if own is not None else sketcher(resize_image(record.image, data_size))
            )
    batch["real"] = np.stack(real)
    batch["mask"] = np.stack(
        [np.frombuffer(m, np.uint8).reshape(data_size, data_size) for m in batch.pop("mask_labels")]
    )
    batch["prompt"] = np.array([str(c[0]) if use_text else "" for c in batch.pop("captions")], dtype=object)
    if sketcher is not None:
        batch["sketch"] = np.stack(sketches)
    return batch


class Generate:
    """Actor holding the checkpoint's ``FaceGenerator``: one image per row, with the row's fixed seed."""

    def __init__(self, checkpoint: str, task: str, steps: int | None, guidance: float | None) -> None:
        import torch

        from modeling.generator import FaceGenerator

        self.generator = FaceGenerator(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
        self.task, self.steps, self.guidance = task, steps, guidance

    def __call__(self, batch: dict) -> dict:
        from modeling.generator import GenerationRequest

        _, use_mask, use_sketch = TASKS[self.task]
        requests = [
            GenerationRequest(
                prompt=str(batch["prompt"][i]),
                mask=batch["mask"][i] if use_mask else None,
                sketch=batch["sketch"][i] if use_sketch else None,
                seed=seed_of(str(record_id)),
            )
            for i, record_id in enumerate(batch["id"])
        ]
        started = time.perf_counter()
        batch["generated"] = np.stack(self.generator.generate(requests, steps=self.steps, guidance=self.guidance))
        batch["generate_s"] = np.full(len(requests), (time.perf_counter() - started) / len(requests))
        batch.pop("sketch", None)
        return batch


class Judge:
    """Actor holding the judges: per-batch scores and embeddings as columns (``BatchScores.columns``)."""

    def __init__(self, judge_paths: dict, task: str) -> None:
        import torch

        from modeling.judges import JudgePaths, load_judges

        self.judges = load_judges(JudgePaths(**judge_paths), device="cuda" if torch.cuda.is_available() else "cpu")
        self.task = task
        self.status = json.dumps({"loaded": self.judges.loaded(), "skipped": self.judges.skipped})

    def __call__(self, batch: dict) -> dict:
        import torch

        from modeling.metrics import score_batch

        use_text, use_mask, _ = TASKS[self.task]
        started = time.perf_counter()
        scores = score_batch(
            self.judges,
            torch.from_numpy(batch["generated"]).permute(0, 3, 1, 2),
            real=torch.from_numpy(batch["real"]).permute(0, 3, 1, 2),
            masks=torch.from_numpy(batch["mask"].astype(np.int64)) if use_mask else None,
            prompts=[str(p) for p in batch["prompt"]] if use_text else None,
            config=SUITE,
        )
        n = len(batch["id"])
        return {
            "id": batch["id"],
            "generate_s": batch["generate_s"],
            "judge_s": np.full(n, (time.perf_counter() - started) / n),
            "judges": np.array([self.status] * n, dtype=object),
            **scores.columns(),
        }


def score_images(generated: np.ndarray, real: np.ndarray, batch: int = 16) -> dict:
    """FID, KID, LPIPS, SSIM and MS-SSIM of ``generated`` (N, H, W, 3) uint8 against the paired ``real`` images, in
    this process with the embedded Inception and LPIPS judges (the judges that need masks, captions or CLIP/DINO
    weights read "skipped: ..."). ``faceforge demo`` scores the yardstick's own images this way: the same faces a
    second time through ``evaluate_paper``'s Ray Data job would double the generation and start two actor pools."""
    import torch

    from modeling.judges import Judges, load_inception, load_lpips
    from modeling.metrics import MetricTally, score_batch

    judges = Judges(device=torch.device("cpu"), inception=load_inception(None), lpips=load_lpips(None))
    for name, why in (("face_parser", "not used (no masks given)"), ("clip", "not used"), ("dino", "not used")):
        judges.skipped[name] = f"skipped: {why}"
    tally = MetricTally(judges.loaded(), judges.skipped, SUITE)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)  # noqa: E731
    for start in range(0, len(generated), batch):
        chunk = slice(start, start + batch)
        tally.add(score_batch(judges, as_tensor(generated[chunk]), real=as_tensor(real[chunk]), config=SUITE))
    size = generated.shape[1]
    metrics = {k: v for k, v in tally.compute().items() if k in ("fid", "kid", "lpips", "ssim", "ms_ssim")}
    return {
        "task": "text+mask",
        "metrics": metrics,
        "n": len(generated),
        "size": size,
        "ms_ssim_method": ms_ssim_plan(size, SUITE.ms_ssim_small, SUITE.ms_ssim_min_size).describe(size),
        "kid_scale": "x1000",
        "mlflow_prefix": mlflow_prefix("text+mask"),
    }


def judge_paths(judges: str | None) -> dict:
    """The embedded Inception, LPIPS and BiSeNet weights; CLIP and DINO from ``judges/clip`` and ``judges/dino``."""
    if judges is None:
        return {}
    return {"clip": str(Path(judges) / "clip"), "dino": str(Path(judges) / "dino")}


def split_files(data: str | Path, manifest: dict, split: str) -> list[str]:
    files = [str(Path(data) / "shards" / s["file"]) for s in manifest["shards"] if s["split"] == split]
    if not files:
        there = ", ".join(sorted({s["split"] for s in manifest["shards"]})) or "none"
        raise ValueError(f"{data}: no '{split}' split in the manifest (splits: {there})")
    return files


@contextmanager
def ordered_ray_data() -> Iterator[None]:
    """Rows in file order while the job runs, so ``limit(n)`` takes the split's first n faces every time."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def pool_resources() -> dict:
    """``map_batches`` arguments for an actor pool: one actor per GPU when there are GPUs, else one CPU actor. The two
    CPU actors take at most half of what is left after one core for reading, or on a 2-core machine the readers
    would wait forever behind them."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return {"compute": ActorPoolStrategy(size=gpus), "num_gpus": 1}
    cpus = float(ray.cluster_resources().get("CPU", 1))
    return {"compute": ActorPoolStrategy(size=1), "num_cpus": min(1.0, max(cpus - 1, 0.5) / 2)}


def evaluate_paper(checkpoint: str | Path, options: PaperEvalOptions) -> dict:
    """Generates ``options.n`` faces of the split on Ray and scores them with the paper metrics; see the module doc."""
    import ray

    from modeling.generator import accepted_inputs, read_weights_config, sampler_defaults
    from modeling.metrics import BatchScores, MetricTally
    from pipelines.data.prepare import load_manifest, verify_prepared
    from pipelines.ray_runtime import ensure_ray

    options.validate()
    checkpoint = resolve_checkpoint(checkpoint)
    config = read_weights_config(checkpoint)
    if TASKS[options.task][2] and not accepted_inputs(config["arch"])["sketch"]:
        raise ValueError(f"--task {options.task}: {config['arch']} takes no sketch (text+mask, mask or text)")
    manifest = load_manifest(options.data)
    verify_prepared(options.data, manifest, options.split, ("id", "mask_labels", "captions"))
    size = int(config["size"])
    ensure_ray()
    started = time.perf_counter()
    with ordered_ray_data():
        rows = (
            ray.data.read_parquet(split_files(options.data, manifest, options.split))
            .select_columns(["id", "mask_labels", "captions"])
            .limit(options.n)
            .map_batches(
                attach_conditions,
                fn_kwargs={"manifest": manifest, "size": size, "task": options.task},
                batch_size=options.batch,
                batch_format="numpy",
            )
            .map_batches(
                Generate,
                fn_constructor_args=(str(weights_dir(checkpoint)), options.task, options.steps, options.guidance),
                batch_size=options.batch,
                batch_format="numpy",
                **pool_resources(),
            )
            .map_batches(
                Judge,
                fn_constructor_args=(judge_paths(options.judges), options.task),
                batch_size=options.batch,
                batch_format="numpy",
                **pool_resources(),
            )
        )
        tally, status, n, seconds = None, None, 0, {"generate_s": 0.0, "judge_s": 0.0}
        for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
            if tally is None:
                status = json.loads(batch["judges"][0])
                tally = MetricTally(status["loaded"], status["skipped"], SUITE)
            tally.add(BatchScores.from_columns(batch))
            n += len(batch["id"])
            for key in seconds:
                seconds[key] += float(batch[key].sum())
    wall = time.perf_counter() - started
    if n < 2:
        raise ValueError(f"{options.data}: the '{options.split}' split has {n} rows; the paper metrics need at least 2")
    metrics = tally.compute()
    state = json.loads((checkpoint / STATE_FILE).read_text()) if (checkpoint / STATE_FILE).is_file() else {}
    result = {
        "task": options.task,
        "metrics": metrics,
        "n": n,
        "split": options.split,
        "checkpoint": str(checkpoint),
        "arch": config["arch"],
        "step": state.get("step"),
        "size": size,
        "steps": options.steps or sampler_defaults(config).steps,
        "guidance": sampler_defaults(config).guidance if options.guidance is None else options.guidance,
        "seeds": "crc32 of each face's id",
        "ms_ssim_method": ms_ssim_plan(size, SUITE.ms_ssim_small, SUITE.ms_ssim_min_size).describe(size),
        "kid_scale": "x1000",
        "mlflow_prefix": mlflow_prefix(options.task),
        "judges": {"loaded": status["loaded"], "skipped": status["skipped"], "from": options.judges},
        "throughput": {
            "images_per_s": round(n / wall, 3),  # the whole job: reading, generating and judging, pipelined
            "generated_per_actor_s": round(n / seconds["generate_s"], 3),
            "judged_per_actor_s": round(n / seconds["judge_s"], 3),
            "wall_s": round(wall, 2),
        },
        "options": asdict(options),
    }
    out = Path(options.out) if options.out else checkpoint / "eval" / f"paper-{options.task.replace('+', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(out)
    if options.log_to_mlflow:
        from pipelines.eval.run import log_result

        prefix = mlflow_prefix(options.task)
        values = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, float)}
        skipped = {f"{prefix}{k}": v for k, v in metrics.items() if not isinstance(v, float)}
        result["mlflow_run_id"] = log_result(checkpoint, result, [out], metrics=values, tags=skipped)
    return result


def find_run(client, name_or_id: str):
    """An MLflow run by id, else the newest run of that name (``faceforge.run_name`` tag or MLflow's run name)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(name_or_id)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    for key in ("tags.`faceforge.run_name`", "attributes.run_name"):
        found = client.search_runs(experiments, f"{key} = '{name_or_id}'", order_by=["start_time DESC"], max_results=1)
        if found:
            return found[0]
    raise ValueError(f"no MLflow run named or with id {name_or_id!r} at {client.tracking_uri}")


def compare_runs(runs: list[str]) -> str:
    """The latest eval/* metrics (and eval/* "skipped: ..." tags) of each run, side by side, as a text table."""
    from mlflow import MlflowClient

    from serve.settings import tracking_uri

    client = MlflowClient(tracking_uri())
    found = [find_run(client, r) for r in runs]
    columns = []
    for run in found:
        values = {k: f"{v:.4g}" for k, v in run.data.metrics.items() if k.startswith("eval/")}
        values |= {k: "skipped" for k, v in run.data.tags.items() if k.startswith("eval/") and k not in values}
        columns.append(values)
    names = sorted(set().union(*columns))
    if not names:
        raise ValueError(f"no eval/* metrics in {', '.join(runs)}; run `faceforge eval RUN --metrics paper` first")
    headers = ["metric", *(f"{run.info.run_name} ({run.info.run_id[:8]})" for run in found)]
    table = [headers, *([name, *(c.get(name, "-") for c in columns)] for name in names)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
