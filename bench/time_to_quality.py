"""Time to quality: steps and seconds until a demo model first reaches mask mIoU 0.5 on the synthetic yardstick.

    python bench/time_to_quality.py [--model mmface|mogle] [--steps 800] [--every 100] [--workdir DIR]

Builds the demo's setting (synthetic faces, the Ray Data precompute, the synthetic parser; reused from
``--workdir`` when present), trains the demo recipe with a checkpoint every ``--every`` steps (``mogle``: the
tiny FLUX base with MoGLE, the stage that learns the faces), scores every checkpoint on the yardstick and prints
one line per checkpoint, then one JSON line: the first step and the seconds (from the first training step, and
from the launch including Ray Train's start-up) at which mIoU >= 0.5, hair and background accuracy >= 0.6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {"mmface": "mmface_dit_tiny.yaml", "mogle": "flux_base_tiny.yaml"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="mmface")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    parser.add_argument("--every", type=int, default=100, help="checkpoint and score every N steps")
    parser.add_argument("--eval-n", type=int, default=64, help="held-out faces per score")
    parser.add_argument("--workdir", default="/tmp/faceforge-ttq")
    parser.add_argument("--score", help="score the checkpoints of an existing run folder instead of training")
    args = parser.parse_args(argv)

    from modeling.checkpoints import checkpoint_step
    from pipelines.data.prepare import prepare
    from pipelines.data.synth import synthesize
    from pipelines.demo import DemoPlan
    from pipelines.eval.parser import train_parser
    from pipelines.eval.run import evaluate
    from pipelines.ray_runtime import ensure_ray
    from pipelines.train.config import load_config
    from pipelines.train.run import train

    plan = DemoPlan()
    steps = args.steps or (plan.mmface_steps if args.model == "mmface" else plan.base_steps)
    work = Path(args.workdir).resolve()
    synth, prepared, parser_dir = work / "synth", work / "prepared", work / "parser"
    if not (synth / "attributes.jsonl").is_file():
        synthesize(synth, n=plan.n, size=plan.size, seed=0)
    ensure_ray(log_to_driver=False)
    if not (prepared / "manifest.json").is_file():
        prepare(plan.prepare_options(synth, prepared), progress=False)
    if not (parser_dir / "config.json").is_file():
        train_parser(parser_dir, size=plan.size, steps=plan.parser_steps)

    if args.score:
        run_dir = Path(args.score).resolve()
        run = run_dir.name
        timeline = run_dir / "timeline.json"
        if timeline.is_file():
            saved = json.loads(timeline.read_text())
            reached, launched = [tuple(p) for p in saved["progress"]], saved["launched"]
        else:
            reached, launched = _timeline_from_checkpoints(run_dir), None
    else:
        run = f"ttq-{args.model}-{int(time.time())}"
        run_dir = work / "runs" / run
        overrides = [
            f"data={prepared}",
            f"storage={work / 'runs'}",
            f"name={run}",
            f"max_steps={steps}",
            f"ckpt_every={args.every}",
            f"keep={steps // args.every + 1}",
            "sample_every=0",
        ]
        reached = []
        launched = time.time()
        config = load_config(Path(__file__).resolve().parents[1] / "configs" / CONFIGS[args.model], overrides)
        train(config, on_progress=lambda done, total: reached.append((done, time.time())))
        (run_dir / "timeline.json").write_text(json.dumps({"launched": launched, "progress": reached}))
    first_step_at = min((t for s, t in reached if s > 0), default=launched or 0.0)

    def seconds_to(step: int) -> tuple[float, float | None]:
        at = min((t for s, t in reached if s >= step), default=time.time())
        return round(at - first_step_at, 1), None if launched is None else round(at - launched, 1)

    rows = []
    for ckpt in sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=checkpoint_step):
        result = evaluate(
            ckpt,
            prepared,
            parser_dir,
            n=args.eval_n,
            out=work / "eval" / run / f"{ckpt.name}.json",
            log_to_mlflow=False,
        )
        attrs = result["attributes"]
        row = {
            "step": checkpoint_step(ckpt),
            "miou": result["miou"],
            "hair": attrs["hair_color"]["accuracy"],
            "background": attrs["background_color"]["accuracy"],
            "s_training": seconds_to(checkpoint_step(ckpt))[0],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def first(predicate) -> dict | None:
        row = next((r for r in rows if predicate(r)), None)
        if row is None:
            return None
        training, total = seconds_to(row["step"])
        return {"step": row["step"], "s_training": training, "s_with_startup": total}

    summary = {
        "model": args.model,
        "steps": rows[-1]["step"] if rows else steps,
        "miou_0.5": first(lambda r: r["miou"] >= 0.5),
        "all_thresholds": first(lambda r: r["miou"] >= 0.5 and r["hair"] >= 0.6 and r["background"] >= 0.6),
        "final": rows[-1] if rows else None,
        "miou_chance": result["miou_chance"] if rows else None,
    }
    print(json.dumps(summary))
    return 0


def _timeline_from_checkpoints(run_dir: Path) -> list[tuple[int, float]]:
    """(step, time) of each checkpoint of a run trained without a timeline: the folders' modification times,
    the first step placed one checkpoint interval before the first checkpoint."""
    from modeling.checkpoints import checkpoint_step

    points = sorted((checkpoint_step(p), p.stat().st_mtime) for p in run_dir.glob("checkpoint_*") if p.is_dir())
    if len(points) >= 2:
        (s0, t0), (s1, t1) = points[0], points[1]
        points.insert(0, (1, t0 - (t1 - t0) * (s0 - 1) / (s1 - s0)))
    return points


if __name__ == "__main__":
    raise SystemExit(main())
