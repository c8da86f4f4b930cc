"""``faceforge demo`` (``make demo``): the whole system end to end on this machine, and proof that it learns.

Synthetic faces -> Ray Data precompute -> the synthetic parser (the yardstick's judge) -> MMFace-DiT and the
two-stage Face-MoGLE trained by the real trainer (Ray Train workers, DeepSpeed, AdamW8bit, EMA) -> the synthetic
yardstick of both (mask mIoU and attribute accuracy on held-out masks and captions, with chance levels) ->
the MLflow registry -> the Ray Serve app generating a grid over HTTP -> ``report.html``.

The console shows one progress line per stage with an ETA; everything Ray, DeepSpeed and MLflow print goes to
``<workdir>/demo.log``. Every stage resumes: a second ``make demo`` reuses what the first one finished.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = 10


@dataclass
class DemoPlan:
    """The embedded setting. Measured on 2 CPU cores: both models pass the yardstick inside the budget."""

    n: int = 1000  # synthetic faces (10% held out)
    size: int = 32
    codec: str = "pixel:2"  # lossless 2x2 space-to-depth: 12 x 16 x 16 latents
    captions: int = 5  # captions encoded per face
    mmface_steps: int = 900
    base_steps: int = 1200
    lora_steps: int = 50
    eval_n: int = 64
    parser_steps: int = 350

    def prepare_options(self, synth: Path, prepared: Path):
        """The precompute of the demo's synthetic faces (also what bench/time_to_quality.py prepares)."""
        from pipelines.data.prepare import PrepareOptions

        return PrepareOptions(
            layout="celebamask-hq",
            root=str(synth),
            out=str(prepared),
            size=self.size,
            codec=self.codec,
            max_captions=self.captions,
            rows_per_shard=128,
        )


@dataclass
class DemoState:
    workdir: Path
    timings: dict[str, float] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)
    paper: dict[str, dict] = field(default_factory=dict)  # FID, KID, LPIPS, SSIM, MS-SSIM per model
    throughput: dict[str, dict] = field(default_factory=dict)  # trainer vs bare loop samples/s per config
    evals_text: dict[str, dict] = field(default_factory=dict)  # the same captions, no mask
    published: dict[str, dict] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)


@contextmanager
def console_and_log(log_path: Path):
    """Yields a stream to the terminal; meanwhile this process's stdout and stderr (Ray, DeepSpeed, MLflow,
    warnings, C++ log lines alike) go to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed below, after the fds are restored
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        console.flush()


def run_demo(workdir: Path, plan: DemoPlan | None = None, serve_samples: bool = True) -> int:
    from pipelines.progress import Stage

    plan = plan or DemoPlan()
    state = DemoState(workdir.resolve())
    log_path = state.workdir / "demo.log"
    started = time.perf_counter()
    with console_and_log(log_path) as console:
        print(f"faceforge demo -> {state.workdir} (details in {log_path})", file=console)
        try:
            for index, (title, step) in enumerate(_stages(plan, state, serve_samples), start=1):
                stage = Stage(title, index, STAGES, stream=console)
                summary = step(stage)
                state.timings[title] = round(stage.done(summary or ""), 1)
        except Exception as error:  # noqa: BLE001 - one line on the terminal, the traceback in the log
            import traceback

            traceback.print_exc()
            print(f"\nfaceforge demo: {type(error).__name__}: {error}\n  full log: {log_path}", file=console)
            return 1
        total = time.perf_counter() - started
        _say_where(console, state, total)
    return 0


def _stages(plan: DemoPlan, state: DemoState, serve_samples: bool):
    w = state.workdir
    synth, prepared, runs, parser = w / "synth", w / "prepared", w / "runs", w / "parser"

    def synthesize_faces(stage) -> str:
        from pipelines.data.synth import synthesize

        info = synthesize(synth, n=plan.n, size=plan.size, seed=0)
        return f"{info['n_train']} train + {info['n_test']} held-out faces, {plan.size}x{plan.size}"

    def prepare_data(stage) -> str:
        from pipelines.data.prepare import prepare
        from pipelines.ray_runtime import ensure_ray

        ensure_ray(log_to_driver=False)
        counts = prepare(
            plan.prepare_options(synth, prepared), progress=False, on_progress=lambda d, t: stage.update(d, t, "shards")
        )["counts"]
        return f"{counts['n_written']} rows written, {counts['n_rejected']} rejected"

    def train_judge(stage) -> str:
        from modeling.judges.synthetic_parser import load_parser
        from pipelines.eval.parser import train_parser

        try:
            judge = load_parser(parser)
            return f"reused: pixel accuracy {judge.config.pixel_accuracy} on held-out renders"
        except (FileNotFoundError, ValueError):
            pass
        info = train_parser(
            parser, size=plan.size, steps=plan.parser_steps, progress=lambda d, t: stage.update(d, t, "steps")
        )
        load_parser(parser)  # refuses a parser under 0.95
        return f"pixel accuracy {info['pixel_accuracy']}, mIoU {info['miou']} on held-out renders"

    def trainer(config: str, run: str, steps: int, *extra: str):
        def train_stage(stage) -> str:
            summary = _train_once(config, run, runs, prepared, steps, list(extra), stage)
            state.runs[run] = summary
            return f"MLflow run {summary['mlflow_run_id']}"

        return train_stage

    def evaluate_models(stage) -> str:
        from pipelines.eval.run import evaluate

        results = []
        models = ("mmface-dit-tiny", "face-mogle-tiny")
        for i, run in enumerate(models):
            # the yardstick's images also get the paper metrics (FID, KID, LPIPS, SSIM, MS-SSIM; embedded judges)
            out = w / "eval" / f"{run}.json"
            result = evaluate(runs / run, prepared, parser, n=plan.eval_n, out=out, paper=True)
            state.evals[run] = result
            state.paper[run] = result["paper"]
            hair = result["attributes"]["hair_color"]["accuracy"]
            fid = result["paper"]["metrics"].get("fid")
            results.append(f"{run}: mIoU {result['miou']}, hair {hair}, FID {_number(fid)}")
            if run == "mmface-dit-tiny":  # Face-MoGLE never generates without a mask (its default layout stands in)
                text = w / "eval" / f"{run}-text.json"
                state.evals_text[run] = evaluate(runs / run, prepared, parser, n=plan.eval_n, out=text, text_only=True)
            stage.update(i + 1, len(models) + 1, "measurements")
        state.throughput = _trainer_vs_bare(state, prepared, runs)
        stage.update(len(models) + 1, len(models) + 1, "measurements")
        return "; ".join(results)

    def publish_models(stage) -> str:
        from pipelines.train.publish import publish

        for i, run in enumerate(("mmface-dit-tiny", "face-mogle-tiny")):
            state.published[run] = publish(run, storage=str(runs), alias="demo")
            stage.update(i + 1, 2, "models")
        return ", ".join(p["model_uri"] for p in state.published.values())

    def serve_grid(stage) -> str:
        if not serve_samples:
            return "skipped"
        state.samples = _samples_over_http(state, prepared, stage)
        return "via POST /v1/generate: " + ", ".join(Path(p).name for p in state.samples.values())

    def write_report(stage) -> str:
        from pipelines.report import write_report

        path = write_report(state, plan)
        return str(path)

    base = f"base_from={runs / 'flux-base-tiny'}"
    train_mmface = trainer("mmface_dit_tiny.yaml", "mmface-dit-tiny", plan.mmface_steps)
    train_base = trainer("flux_base_tiny.yaml", "flux-base-tiny", plan.base_steps)
    train_lora = trainer("face_mogle_tiny.yaml", "face-mogle-tiny", plan.lora_steps, base)
    return [
        (f"Drawing {plan.n} synthetic faces with known attributes", synthesize_faces),
        ("Precomputing latents and MiniLM text embeddings (Ray Data)", prepare_data),
        ("Training the synthetic parser (the yardstick's judge)", train_judge),
        ("Training MMFace-DiT (2 Ray Train workers, DeepSpeed, AdamW8bit, EMA)", train_mmface),
        ("Training Face-MoGLE stage 1: the tiny FLUX base with MoGLE", train_base),
        ("Training Face-MoGLE stage 2: condition LoRA + MoGLE on the frozen base", train_lora),
        ("Measuring both on held-out masks and captions (synthetic yardstick)", evaluate_models),
        ("Publishing both to the MLflow registry", publish_models),
        ("Generating faces through the Ray Serve app (HTTP)", serve_grid),
        ("Writing the report", write_report),
    ]


def _train_once(config_name: str, run: str, runs: Path, prepared: Path, steps: int, extra: list[str], stage) -> dict:
    """Trains unless this run already reached ``steps``; the summary of its newest checkpoint either way."""
    from modeling.checkpoints import checkpoint_step, newest_complete
    from pipelines.train.config import load_config
    from pipelines.train.run import mlflow_run_of, train

    overrides = [f"data={prepared}", f"storage={runs}", f"name={run}", f"max_steps={steps}", *extra]
    latest = newest_complete(runs / run)
    if latest is None or checkpoint_step(latest) < steps:
        train(load_config(CONFIGS / config_name, overrides), on_progress=lambda d, t: stage.update(d, t, "steps"))
        latest = newest_complete(runs / run)
    return {
        "run": run,
        "checkpoint": str(latest),
        "step": checkpoint_step(latest),
        "mlflow_run_id": mlflow_run_of(runs / run),
    }


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _trainer_vs_bare(state: DemoState, prepared: Path, runs: Path, steps: int = 20) -> dict[str, dict]:
    """The trainer's samples/s of each from-scratch run (its MLflow ``train/samples_per_s``, the median over its
    logging windows after the first) beside a bare data-parallel loop of the same model, batch, workers and threads
    (``pipelines.train.reference``) run now on the same cores."""
    import statistics

    from mlflow import MlflowClient

    from pipelines.data.prepare import load_manifest
    from pipelines.train.config import load_config
    from pipelines.train.reference import reference_samples_per_s
    from serve.settings import tracking_uri

    client = MlflowClient(tracking_uri())
    manifest = load_manifest(prepared)
    out = {}
    for config_name, run in (("mmface_dit_tiny.yaml", "mmface-dit-tiny"), ("flux_base_tiny.yaml", "flux-base-tiny")):
        summary = state.runs.get(run)
        if not summary:
            continue
        history = client.get_metric_history(summary["mlflow_run_id"], "train/samples_per_s")
        values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
        if not values:
            continue
        config = load_config(CONFIGS / config_name, [f"data={prepared}", f"storage={runs}", f"name={run}"])
        from pipelines.train.run import leave_cpu_headroom

        leave_cpu_headroom(config)  # the threads per worker the trainer ran with
        trainer = statistics.median(values)
        bare = reference_samples_per_s(config, manifest, steps, "bare")
        out[run] = {"trainer_samples_per_s": round(trainer, 1), "bare_samples_per_s": round(bare, 1),
                    "ratio": round(trainer / bare, 3)}  # fmt: skip
    return out


def _samples_over_http(state: DemoState, prepared: Path, stage) -> dict[str, str]:
    """Serve the two published versions on a free loopback port, ask for held-out faces, save mask | face grids."""
    import base64
    import io
    import socket

    import numpy as np
    from PIL import Image
    from ray import serve

    from modeling.conditions import labels_to_color
    from pipelines.data.synth import full_caption
    from pipelines.eval.run import held_out, real_image
    from serve.app import build_app
    from serve.client import request_json
    from serve.settings import tracking_uri

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ids, labels, attributes = held_out(prepared, 8)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = {}
    try:
        settings = {"tracking_uri": tracking_uri(), "default_model": "faceforge-mmface-dit@demo",
                    "capacity": {"model_num_cpus": 0.5}}  # fmt: skip
        serve.run(build_app(settings), name="faceforge-demo", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        for k, run in enumerate(("mmface-dit-tiny", "face-mogle-tiny")):
            model = state.published[run]["registered_model"] + "@demo"
            rows = []
            for i, (labels_i, attrs) in enumerate(zip(labels, attributes)):
                buffer = io.BytesIO()
                Image.fromarray(labels_to_color(labels_i)).save(buffer, format="PNG")
                body = {"model": model, "prompt": full_caption(attrs), "seed": i, "n": 1,
                        "mask": base64.b64encode(buffer.getvalue()).decode()}  # fmt: skip
                answer = request_json(url, "/v1/generate", body)
                face = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))
                real = real_image(prepared, ids[i], face.shape[0])
                rows.append(np.concatenate([labels_to_color(labels_i), face, real], axis=1))
                stage.update(k * len(ids) + i + 1, 2 * len(ids), "images")
            path = state.workdir / "samples" / f"{run}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid = Image.fromarray(np.concatenate(rows, 0))
            grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)
            out[run] = str(path)
    finally:
        serve.shutdown()
    return out


def _say_where(console, state: DemoState, total: float) -> None:
    from pipelines.progress import duration

    lines = [f"\nfaceforge demo finished in {duration(total)}.", ""]
    for run, result in state.evals.items():
        attrs = result["attributes"]
        lines.append(
            f"  {run:16s} mask mIoU {result['miou']:.2f} (chance {result['miou_chance']:.2f}, "
            f"shuffled {result['miou_shuffled']:.2f}); hair colour {attrs['hair_color']['accuracy']:.2f} "
            f"(chance {attrs['hair_color']['chance']:.2f}); background {attrs['background_color']['accuracy']:.2f} "
            f"(chance {attrs['background_color']['chance']:.2f})"
        )
    for run, result in state.evals_text.items():
        attrs = result["attributes"]
        lines.append(
            f"  {run:16s} from text alone: faces {result['face_rate']:.2f}; hair colour "
            f"{attrs['hair_color']['accuracy']:.2f}; background {attrs['background_color']['accuracy']:.2f}"
        )
    for run, result in state.paper.items():
        m = result["metrics"]
        lines.append(
            f"  {run:16s} FID {_number(m.get('fid'))}, KID {_number(m.get('kid'))} (x1000), LPIPS "
            f"{_number(m.get('lpips'))}, SSIM {_number(m.get('ssim'))}, MS-SSIM {_number(m.get('ms_ssim'))} "
            f"({result['n']} held-out faces, text+mask)"
        )
    for run, t in state.throughput.items():
        lines.append(
            f"  {run:16s} trainer {t['trainer_samples_per_s']} samples/s, bare loop {t['bare_samples_per_s']} "
            f"samples/s on the same cores ({t['ratio']:.2f} of bare)"
        )
    lines += [
        "",
        f"  report:       {state.workdir / 'report.html'}",
        f"  samples:      {state.workdir / 'samples'}/*.png   (mask | generated | real)",
        f"  evaluations:  {state.workdir / 'eval'}/*.json",
        f"  models:       {', '.join(p['model_uri'] for p in state.published.values())}",
        f"  log:          {state.workdir / 'demo.log'}",
        "  MLflow UI:    .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1",
        "  serve them:   .venv/bin/faceforge serve --model faceforge-mmface-dit@demo   (then http://127.0.0.1:8000/)",
    ]
    print("\n".join(lines), file=console)
    (state.workdir / "demo_summary.json").write_text(
        json.dumps({"timings_s": state.timings, "total_s": round(total, 1), "runs": state.runs,
                    "published": state.published, "samples": state.samples, "throughput": state.throughput,
                    "paper_metrics": {k: v["metrics"] for k, v in state.paper.items()}}, indent=2, default=str) + "\n"
    )  # fmt: skip
