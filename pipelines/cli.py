"""``faceforge``: the command line. ``python -m pipelines`` is the same program.

Each subcommand parses its arguments here and hands off to the module that does the work; heavy imports
(torch, Ray, MLflow) happen only inside the handler that needs them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DESCRIPTION = """\
faceforge: train and serve controllable face generators (MMFace-DiT, Face-MoGLE) on Ray.

Typical flow:
  faceforge data synth --out data/synth --n 512            # or bring a dataset in a known layout
  faceforge data check --layout celebamask-hq --root data/synth
  faceforge data prepare --layout celebamask-hq --root data/synth --out data/synth-64
  faceforge train configs/mmface_dit_tiny.yaml data=data/synth-64
  faceforge model info mmface-dit-xl
  faceforge import mmface-dit dit_model_weights_ema.safetensors --out imported/mmface-dit
"""


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


# ------------------------------------------------------------------------------------------------ data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from pipelines.data.synth import synthesize

    info = synthesize(Path(args.out), n=args.n, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from pipelines.data.readers import check_dataset, open_reader

    report = check_dataset(open_reader(args.layout, args.root, **_reader_options(args)))
    problems = report.get("problems", [])
    shown = problems if args.all_problems else problems[:20]
    summary = {k: v for k, v in report.items() if k != "problems"}
    print(json.dumps(summary, indent=2))
    for problem in shown:
        print(f"  {problem['id']}: {problem['reason']}")
    if len(shown) < len(problems):
        print(f"  ... and {len(problems) - len(shown)} more (--all-problems lists them)")
    if report["n_ok"] == 0:
        print(f"faceforge: nothing readable under {args.root} as layout {args.layout}", file=sys.stderr)
        return 1
    return 0


def _reader_options(args: argparse.Namespace) -> dict:
    return {"test_from": args.test_from} if getattr(args, "test_from", None) is not None else {}


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from pipelines.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        layout=args.layout,
        root=args.root,
        out=args.out,
        size=args.size,
        codec=args.codec,
        text=args.text,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        rows_per_shard=args.rows_per_shard,
        encode_batch=args.encode_batch,
        max_captions=args.max_captions,
        sketch_model=args.sketch_model,
        allow_uncaptioned=args.allow_uncaptioned,
        reader_options=_reader_options(args),
        num_encoders=args.num_encoders,
    )
    manifest = prepare(options, progress=not args.quiet)
    counts = manifest["counts"]
    print(
        f"wrote {counts['n_written']} rows, rejected {counts['n_rejected']} of {counts['n_input']} "
        f"into {args.out}/shards ({len(manifest['shards'])} shards); manifest: {args.out}/manifest.json"
    )
    if counts["n_rejected"]:
        print(f"rejected records and reasons: {args.out}/rejects.jsonl")
    return 0 if counts["n_written"] else 1


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from pipelines.data.prepare import inspect_field

    array = inspect_field(args.out_dir, args.id, args.field)
    np.save(args.out, array)
    print(f"{args.field} of {args.id}: shape {list(array.shape)} {array.dtype} -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------- model


def cmd_model_info(args: argparse.Namespace) -> int:
    from modeling.presets import describe

    print(json.dumps(describe(args.preset), indent=2))
    return 0


# ------------------------------------------------------------------------------------------ train etc.


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train.run import train_from_cli

    return train_from_cli(args.config, args.overrides)


def cmd_publish(args: argparse.Namespace) -> int:
    from pipelines.train.publish import publish_from_cli

    return publish_from_cli(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import ensure_ray, stop_ray
    from serve.local import serve_forever
    from serve.settings import ServeSettings

    settings = {
        "default_model": args.model,
        "weights": args.weights,
        "batching": {"max_batch_size": args.max_batch_size},
        "limits": {"max_n": args.max_n, "max_steps": args.max_steps},
    }
    ServeSettings.from_dict(settings)  # refuse bad values before Ray starts
    ensure_ray(num_cpus=args.num_cpus, local=True)
    try:
        return serve_forever(args.port, settings)
    finally:
        stop_ray()


def cmd_generate(args: argparse.Namespace) -> int:
    from serve.client import ClientError, generate

    try:
        answer = generate(
            args.url,
            args.out,
            prompt=args.prompt,
            mask=args.mask,
            sketch=args.sketch,
            n=args.n,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            model=args.model,
            token=args.token,
            example=args.example,
        )
    except ClientError as error:
        print(f"faceforge: {error}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from modeling.checkpoints import WEIGHTS_DIR
    from modeling.importers import ADAPTER_FILE, import_face_mogle, import_mmface_dit

    out = Path(args.out)
    if args.arch == "mmface-dit":
        summary = import_mmface_dit(
            args.weights,
            out / WEIGHTS_DIR,
            preset=args.preset,
            objective=args.objective,
            vae=args.vae,
            text=args.text,
            size=args.size,
            overwrite=args.overwrite,
        )
    else:
        summary = import_face_mogle(
            args.lora,
            args.mogle,
            args.base,
            out / WEIGHTS_DIR,
            adapter_path=out / ADAPTER_FILE,
            preset=args.preset,
            vae=args.vae,
            text=args.text,
            size=args.size,
            overwrite=args.overwrite,
        )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoPlan, run_demo

    plan = DemoPlan()
    for key in ("n", "mmface_steps", "base_steps", "lora_steps", "eval_n"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    return run_demo(Path(args.workdir), plan, serve_samples=not args.no_serve)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.target == "train-parser":
        from pipelines.eval.parser import train_parser

        if not args.out:
            raise UserError("faceforge eval train-parser needs --out DIR (where the parser is saved)")
        info = train_parser(args.out, size=args.size, steps=args.parser_steps, n_train=args.renders)
        print(json.dumps(info, indent=2))
        if not info["counts_as_judge"]:
            print(f"faceforge: parser accuracy {info['pixel_accuracy']} < 0.95: not a judge; raise --parser-steps",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if args.compare:
        from pipelines.eval.paper import compare_runs

        print(compare_runs(args.compare))
        return 0
    if not args.target:
        raise UserError("faceforge eval: name a run folder or checkpoint (or train-parser, or --compare); see --help")
    target = Path(args.target)
    if not target.exists() and (Path(args.storage) / args.target).exists():
        target = Path(args.storage) / args.target
    if args.metrics == "paper":
        return _eval_paper(target, args)
    from pipelines.eval.run import evaluate

    if not args.data or not args.parser:
        raise UserError("faceforge eval RUN needs --data PREPARED (a synthetic dataset) and --parser DIR")
    if args.task not in ("text+mask", "text"):
        raise UserError(f"faceforge eval: --task {args.task} needs --metrics paper (the yardstick: text+mask or text)")
    result = evaluate(target, args.data, args.parser, n=args.n, steps=args.steps, guidance=args.guidance, out=args.out,
                      text_only=args.task == "text")  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "prompts"}, indent=2))
    return 0


def _eval_paper(target: Path, args: argparse.Namespace) -> int:
    from pipelines.eval.paper import PaperEvalOptions, evaluate_paper

    if not args.data:
        raise UserError("faceforge eval RUN --metrics paper needs --data PREPARED (its split gives the conditions)")
    options = PaperEvalOptions(
        data=args.data,
        split=args.split,
        n=args.n,
        task=args.task,
        judges=args.judges,
        steps=args.steps,
        guidance=args.guidance,
        batch=args.batch,
        out=args.out,
    )
    result = evaluate_paper(target, options)
    print(json.dumps({k: v for k, v in result.items() if k != "options"}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceforge", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="synthesise, check and precompute datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = data_sub.add_parser("synth", help="write synthetic faces with known attributes (celebamask-hq layout)")
    synth.add_argument("--out", required=True, help="folder to write (created)")
    synth.add_argument("--n", type=int, default=256, help="number of faces (default 256)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    synth.add_argument("--overwrite", action="store_true", help="replace a folder that holds other files")
    synth.set_defaults(func=cmd_data_synth)

    layouts = "celebamask-hq, mmcelebahq, mmface, folder"
    check = data_sub.add_parser("check", help="count records and list problems; exit 1 when nothing is readable")
    check.add_argument("--layout", required=True, help=f"dataset layout: {layouts}")
    check.add_argument("--root", required=True, help="dataset folder")
    check.add_argument("--test-from", type=int, help="numeric ids from here on are the test split (default 27000)")
    check.add_argument("--all-problems", action="store_true", help="list every problem, not the first 20")
    check.set_defaults(func=cmd_data_check)

    prep = data_sub.add_parser(
        "prepare",
        help="precompute latents and text embeddings into Parquet shards (Ray Data)",
        description="Reads a dataset, validates and transforms every record, encodes images, masks, sketches "
        "and captions on an actor pool, and writes OUT/shards/*.parquet + OUT/manifest.json + OUT/rejects.jsonl. "
        "Re-running on the same OUT skips finished shards.",
    )
    prep.add_argument("--layout", required=True, help=f"dataset layout: {layouts}")
    prep.add_argument("--root", required=True, help="dataset folder")
    prep.add_argument("--out", required=True, help="output folder (resumable)")
    prep.add_argument("--size", type=int, default=64, help="square training resolution in pixels (default 64)")
    prep.add_argument(
        "--codec", default="pixel", help="'pixel' (lossless pixel-unshuffle, default) or a local AutoencoderKL folder"
    )
    prep.add_argument(
        "--text",
        default="minilm",
        help="'minilm' (default, bundled), a local CLIP text folder, or flux:T5PATH,CLIPPATH",
    )
    prep.add_argument("--targets", default="mmface,mogle", help="which models' fields to write (default both)")
    prep.add_argument("--rows-per-shard", type=int, default=64, help="rows per Parquet shard (default 64)")
    prep.add_argument("--encode-batch", type=int, default=16, help="records per encoder forward (default 16)")
    prep.add_argument("--max-captions", type=int, default=10, help="captions kept per image (default 10)")
    prep.add_argument("--sketch-model", help="TorchScript sketch extractor (default: built-in line drawing)")
    prep.add_argument("--allow-uncaptioned", action="store_true", help="keep records without captions ('')")
    prep.add_argument("--test-from", type=int, help="numeric ids from here on are the test split (default 27000)")
    prep.add_argument("--num-encoders", type=int, help="encoder actors (default: one per GPU, else cores/2)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_data_prepare)

    insp = data_sub.add_parser("inspect", help="export one stored field of one row as .npy")
    insp.add_argument("out_dir", metavar="OUT", help="a prepared folder")
    insp.add_argument("--id", required=True, help="record id")
    insp.add_argument("--field", required=True, help="e.g. image_latent, mask_labels, text_seq, cond_latents")
    insp.add_argument("--out", required=True, help="the .npy file to write")
    insp.set_defaults(func=cmd_data_inspect)

    model = sub.add_parser("model", help="inspect model presets")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = model_sub.add_parser("info", help="parameter counts of a preset as JSON (meta device, no weights)")
    info.add_argument("preset", help="e.g. mmface-dit-xl, mmface-dit-tiny, face-mogle-flux-dev, face-mogle-tiny")
    info.set_defaults(func=cmd_model_info)

    train = sub.add_parser(
        "train",
        help="train a model from prepared shards (Ray Train + DeepSpeed)",
        description="faceforge train CONFIG [key=value ...]: dotted keys override the YAML config, "
        "e.g. data=PATH max_steps=20 zero_stage=3 train.lr=1e-4. Re-running with the same run name resumes.",
    )
    train.add_argument("config", help="a YAML config, e.g. configs/mmface_dit_tiny.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    train.set_defaults(func=cmd_train)

    publish = sub.add_parser(
        "publish",
        help="register a run's checkpoint (or an imported weights folder) as an MLflow model version",
        description="Register a checkpoint's serving weights as a version of faceforge-mmface-dit or "
        "faceforge-face-mogle. RUN is a run name under --storage, or a weights folder written by "
        "`faceforge import` (logged into a new run of the 'imported' experiment).",
    )
    publish.add_argument("run", help="run name under --storage, or a weights folder from `faceforge import`")
    publish.add_argument("--storage", default="runs", help="the runs folder (default runs)")
    publish.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    publish.add_argument("--alias", help="point this alias (e.g. champion) of the registered model at the new version")
    publish.add_argument(
        "--examples-from",
        help="prepared dataset whose held-out masks, sketches and captions ship as the version's examples "
        "(default: the data the run trained on)",
    )
    publish.set_defaults(func=cmd_publish)

    srv = sub.add_parser(
        "serve",
        help="serve the registered models over HTTP on 127.0.0.1 (Ray Serve; page at /, API at /v1)",
        description="Starts a private local Ray, deploys the faceforge Serve application against the MLflow registry "
        "(MLFLOW_TRACKING_URI, default sqlite:///mlruns/mlflow.db) and serves until Ctrl-C or SIGTERM, then stops "
        "Ray. Set FACEFORGE_API_TOKEN to require 'Authorization: Bearer <token>' on /v1 routes. On a cluster use "
        "`serve deploy cluster/serve.yaml` instead.",
    )
    srv.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    srv.add_argument(
        "--model", help="default model: NAME, NAME/VERSION or NAME@ALIAS (default: the first registered name, newest)"
    )
    srv.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"), help="EMA or raw weights")
    srv.add_argument("--max-batch-size", type=int, default=8, help="images per sampler call (default 8)")
    srv.add_argument("--max-n", type=int, default=8, help="images per request (default 8)")
    srv.add_argument("--max-steps", type=int, default=100, help="sampler steps per request (default 100)")
    srv.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser(
        "generate",
        help="ask a running faceforge server for faces and save them as PNGs",
        description="POSTs to URL/v1/generate and writes OUT/<seed>.png for every image.",
    )
    gen.add_argument("--url", default="http://127.0.0.1:8000", help="server (default http://127.0.0.1:8000)")
    gen.add_argument("--prompt", default="", help="the caption")
    gen.add_argument("--mask", help="mask PNG: label map (grey 0..18) or CelebAMask-HQ colour-coded")
    gen.add_argument("--sketch", help="sketch PNG (dark lines on white; MMFace-DiT)")
    gen.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    gen.add_argument("--seed", type=int, help="seed of the first image (default random)")
    gen.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    gen.add_argument("--model", help="NAME, NAME/VERSION or NAME@ALIAS (default: the server's default)")
    gen.add_argument("--token", help="API token (default: $FACEFORGE_API_TOKEN)")
    gen.add_argument(
        "--example",
        type=int,
        metavar="K",
        help="use the model's example K (GET /v1/models): its mask, and its caption unless --prompt is given",
    )
    gen.add_argument("--out", required=True, help="folder for the PNGs")
    gen.set_defaults(func=cmd_generate)

    add_import_parser(sub)

    ev = sub.add_parser(
        "eval",
        help="score a trained model (synthetic yardstick, or the papers' metrics), compare runs, or train the parser",
        description="faceforge eval RUN --data PREPARED --parser DIR: generates one face per held-out mask and "
        "caption of a synthetic dataset, and measures mask adherence (mIoU of the synthetic parser's reading of "
        "the image against the mask) and text adherence (each stated colour read back from the pixels of its "
        "part), each beside its chance level and a shuffled-conditions baseline. Metrics go to the run's MLflow "
        "run as eval/*, and to a JSON file. faceforge eval train-parser --out DIR trains the parser. "
        "--metrics paper: FID, KID (x1000), LPIPS, SSIM, MS-SSIM against the real faces, mask accuracy and mIoU "
        "(BiSeNet parser), CLIP score, CMMD and DINO structure (with --judges) of faces generated from a prepared "
        "split on Ray Data actor pools, logged as eval/<task>/<metric>. --compare RUN_A RUN_B ...: their latest eval/* "
        "metrics side by side.",
    )
    ev.add_argument("target", nargs="?", help="a run folder (its newest checkpoint), a checkpoint, or train-parser")
    ev.add_argument("--data", help="the prepared synthetic dataset (its held-out split gives the conditions)")
    ev.add_argument("--parser", help="the synthetic parser's folder (faceforge eval train-parser)")
    ev.add_argument("--storage", default="runs", help="where run names are looked up (default runs)")
    ev.add_argument("--n", type=int, default=64, help="held-out faces to generate (default 64)")
    ev.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    ev.add_argument("--guidance", type=float, help="guidance (default: the model's)")
    ev.add_argument("--out", help="JSON file (default CHECKPOINT/eval/yardstick.json or paper-TASK.json); the "
                    "parser's folder for train-parser")  # fmt: skip
    ev.add_argument(
        "--metrics",
        choices=("yardstick", "paper"),
        default="yardstick",
        help="yardstick (default: synthetic data, --parser) or paper (SPEC §3 metrics, any prepared data)",
    )
    ev.add_argument("--split", default="test", help="paper: the prepared split to generate from (default test)")
    ev.add_argument(
        "--task",
        default="text+mask",
        choices=("text+mask", "mask", "text", "text+sketch"),
        help="the conditions given to the model (default text+mask); the yardstick takes text+mask or text (captions "
        "alone: scores how many are faces and the colours stated, read where the parser finds each part)",
    )
    ev.add_argument(
        "--judges",
        help="paper: folder holding clip/ and dino/ (local Hugging Face folders) for CLIP "
        "score, CMMD and DINO structure; without it they are reported as skipped",
    )
    ev.add_argument("--batch", type=int, default=8, help="paper: images per generator/judge batch (default 8)")
    ev.add_argument("--compare", nargs="+", metavar="RUN", help="MLflow run names or ids: their eval/* side by side")
    ev.add_argument("--size", type=int, default=32, help="train-parser: render size (default 32)")
    ev.add_argument("--parser-steps", type=int, default=500, help="train-parser: training steps (default 500)")
    ev.add_argument("--renders", type=int, default=4000, help="train-parser: training renders (default 4000)")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser(
        "demo",
        help="the whole pipeline end to end on synthetic faces, on this machine, and proof that it learns",
        description="synth -> prepare -> parser -> MMFace-DiT, Face-MoGLE (2 stages) -> yardstick -> registry -> "
        "Serve -> DEMO/report.html. Resumes: a second run reuses finished stages. Output of Ray and the trainers "
        "goes to WORKDIR/demo.log.",
    )
    demo.add_argument("--workdir", default="demo_out", help="where the demo writes (default demo_out)")
    demo.add_argument("--n", type=int, help="synthetic faces (default 1000)")
    demo.add_argument("--mmface-steps", type=int, help="MMFace-DiT training steps (default 900)")
    demo.add_argument("--base-steps", type=int, help="Face-MoGLE base steps (default 1200)")
    demo.add_argument("--lora-steps", type=int, help="Face-MoGLE LoRA steps (default 50)")
    demo.add_argument("--eval-n", type=int, help="held-out faces judged per model (default 64)")
    demo.add_argument("--no-serve", action="store_true", help="skip the Serve stage")
    demo.set_defaults(func=cmd_demo)
    return parser


IMPORT_EPILOG = """\
The folder written, OUT/weights/ (config.json + model.safetensors), is what a training checkpoint's weights/
is: serve it, or start a run from it with init_from=OUT. Fine-tuning keeps the behaviour the released
model was trained with only when the run says so: for MMFace-DiT model.options.text_rope=false
model.options.timestep_scale=0.999 (rfm; 1.0 for ddpm) and data encoded without the VAE's latent shift;
for Face-MoGLE "model.options.mogle={time_scale: 1.0}". Face-MoGLE imports also write
OUT/adapter.safetensors: the same LoRA + MoGLE in save_adapter's format (diffusers' LoRA names).
"""


def add_import_parser(sub) -> None:
    imp = sub.add_parser(
        "import",
        help="convert the papers' released checkpoints into a faceforge weights folder",
        description="Converts a released checkpoint into OUT/weights/. Every official tensor must be used exactly "
        "once: a missing, extra or misshapen key is an error naming it.",
        epilog=IMPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp_sub = imp.add_subparsers(dest="arch", required=True, metavar="ARCH")

    dit = imp_sub.add_parser(
        "mmface-dit",
        help="dit_model_weights_ema.safetensors of the MMFace-DiT public code",
        description="faceforge import mmface-dit WEIGHTS --out DIR: converts the public code's EMA weights (flow or "
        "DDPM variant). The imported model keeps the public code's behaviour: no RoPE on text tokens and latents "
        "without the VAE's shift (the codec entry carries shift 0).",
    )
    dit.add_argument(
        "weights", help="the released .safetensors (e.g. checkpoint-283517/dit_model_weights_ema.safetensors)"
    )
    dit.add_argument("--out", required=True, help="folder to write; the weights go to OUT/weights/")
    dit.add_argument("--preset", default="mmface-dit-xl", help="architecture of the checkpoint (default mmface-dit-xl)")
    dit.add_argument(
        "--objective",
        choices=["rfm", "ddpm"],
        default="rfm",
        help="which variant the checkpoint is: rfm (rectified flow, default) or ddpm",
    )
    dit.add_argument("--vae", default="/models/FLUX.1-dev/vae", help="FLUX VAE folder (default /models/FLUX.1-dev/vae)")
    dit.add_argument(
        "--text",
        default="/models/stable-diffusion-2-1/text_encoder",
        help="SD-2.1 CLIP text folder (default /models/stable-diffusion-2-1/text_encoder)",
    )
    dit.add_argument("--size", type=int, default=256, help="serving resolution: 256 or 512 as trained (default 256)")
    dit.add_argument("--overwrite", action="store_true", help="replace weights already in OUT/weights/")
    dit.set_defaults(func=cmd_import)

    mogle = imp_sub.add_parser(
        "face-mogle",
        help="pytorch_lora_weights.safetensors + global_local_mask_moe.pt of the Face-MoGLE public code",
        description="faceforge import face-mogle --lora L --mogle M --base FLUX --out DIR: the condition LoRA and "
        "the MoGLE weights become OUT/weights/ (trainable tensors only, base_from = --base).",
    )
    mogle.add_argument("--lora", required=True, help="the released pytorch_lora_weights.safetensors")
    mogle.add_argument("--mogle", required=True, help="the released MoGLE .pt (read with weights_only=True)")
    mogle.add_argument("--base", required=True, help="local diffusers FLUX.1-dev folder the LoRA was trained on")
    mogle.add_argument("--out", required=True, help="folder to write; the weights go to OUT/weights/")
    mogle.add_argument("--preset", default="face-mogle-flux-dev", help="default face-mogle-flux-dev")
    mogle.add_argument("--vae", help="VAE folder (default BASE/vae)")
    mogle.add_argument("--text", help="text encoders (default flux:BASE/text_encoder_2,BASE/text_encoder)")
    mogle.add_argument("--size", type=int, default=512, help="serving resolution (default 512)")
    mogle.add_argument("--overwrite", action="store_true", help="replace weights already in OUT/weights/")
    mogle.set_defaults(func=cmd_import)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends a command like Ctrl-C: the same cleanup, the same message."""
    import signal
    import threading

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _interrupt_on_sigterm()
    # a tracking server makes MLflow write run links to stdout, which is each command's JSON answer
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError,
            ConnectionError) as error:  # fmt: skip
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"faceforge: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceforge: interrupted; nothing is left running (a training run resumes with the same command)",
              file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
