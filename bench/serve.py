"""Serving throughput and latency: the Ray Serve app against the bare generator loop, batched against unbatched.

    python bench/serve.py                                    # tiny MMFace-DiT, 64², CPU, 10 steps
    python bench/serve.py --quick                            # the smoke test's short run
    python bench/serve.py --model mmface-dit-xl --device cuda --per-client 2 --min 8   # GPU: XL, 256², 28 steps
    python bench/serve.py --model mmface-dit-xl --device cpu --depth 1 --steps 2 --quick   # XL path on CPU

What is compared, in one run on one machine:

- Serve, batched (``batching.max_batch_size`` 8) and unbatched (1), two applications up side by side (at
  ``/batched`` and ``/unbatched``, never driven at once), each warmed before anything is timed: for each
  concurrency c in (1, 8, 32), ``max(4c, 16)`` real HTTP requests (``POST /v1/generate``, one image each) from c
  client threads in a closed loop: images/s, p50/p99 latency and the mean images per sampler call (from the
  ``batch_size`` each answer reports).
- The bare loop: ``FaceGenerator.generate`` in this process on the same requests, batches of 1 and 8, with the
  same torch thread count as the Serve replica (``OMP_NUM_THREADS``, which Ray's workers inherit), each image then
  encoded as a PNG as the replica does: the bare loop does the work a Serve answer holds (``png_share``: the part
  of its time the PNGs took, about 1% at 64², tiny MMFace-DiT).
- The ratios come from ``--rounds`` (3) interleaved rounds on the same requests, each: the bare loop at batch 8,
  Serve batched at the highest concurrency, the bare loop at batch 1, Serve unbatched at the highest concurrency.
  On a shared machine the load moves within a run; interleaving puts it on both sides of each ratio alike.
  ``serve_vs_bare``: batched Serve over the bare loop at the same batch (``max_batch_size``);
  ``unbatched_vs_bare``: unbatched Serve over the bare loop at batch 1; ``batching_speedup``: batched over
  unbatched Serve. Each is the median over the rounds, with ``*_range`` (min, max).
- Where the CPU goes, per level and round (``cpu``: cores used; ``cpu_ms_per_image``): the model replica, the
  ingress, the HTTP proxy, the client threads (their own CPU time; the client parses the JSON answer and decodes
  no image), the rest of Ray (controller, raylet, GCS, the driver's threads), and ``other``: every process on the
  machine that is not this bench's. The client and the server share the machine, so the client's CPU is CPU the
  server did not get: it is reported, not subtracted. ``replica_cpu_vs_bare``: the bare loop's CPU per image at
  the same batch over the replica process's (1.0: the replica spends nothing beyond the sampler and the PNGs);
  ``serve_cpu_vs_bare``: over the whole Serve side's (replica, ingress, proxy, client, Ray). With two cores and
  one torch thread, what the Serve side spends beyond the replica (about 0.25 cores for the tiny model at
  ~10 images/s) runs beside the replica when the second core is free, and out of the replica's share when
  something else keeps the machine busy.
- A bounded load test on the batched deployment: 200 requests at concurrency 16; every non-200 is an error.

The XL line halves the requests per level (``max(2c, 8)``) to keep the run short on a lent GPU (setup alone
writes, publishes and loads 1.35 B parameters, 5 GiB in fp32, three times, held at once: the bare loop and the
two replicas); the load test keeps its 200.

Every request: the same steps and guidance (classifier-free guidance, so each sampler step is a doubled batch),
a fixed prompt, a fixed seed, a face mask on every other one. The model has random (perturbed) weights, written
the way the trainer writes them and published into a throw-away SQLite MLflow registry: sampling speed does not
depend on what a model learned. ``--model-dir`` serves a real weights folder instead.

MMFace-DiT-XL without the paper's FLUX VAE and OpenCLIP ViT-H (nothing is downloaded): the ``pixel:8`` codec
gives the FLUX VAE's 32x32 latent grid at 256², so the transformer sees the same 256 image tokens; its 192
channels replace the VAE's 16 (``latent_channels`` 192: only the patch embedding and the final layer grow,
< 1% of the FLOPs). MiniLM (384-d) replaces CLIP-H (1024-d), and the prompts are long enough to fill its
77-token window, the 77 tokens CLIP always gives. Not timed then: the VAE decoder and the CLIP encoder, which
run once per image, not once per step; ``--codec PATH --text PATH`` puts the real ones in.

Progress goes to stderr; ONE JSON line is printed last on stdout: ``device``, ``model``, ``steps``, ``results``
(``mode``, ``concurrency``, ``requests``, ``errors``, ``images_per_s``, ``p50_s``, ``p99_s``, ``mean_batch``,
``cpu``, ``cpu_ms_per_image``), ``rounds``, ``bare`` ({batch: median images/s}), ``batching_speedup``,
``serve_vs_bare``, ``unbatched_vs_bare`` (each with ``*_range``), ``replica_cpu_vs_bare``, ``serve_cpu_vs_bare``,
``png_share``, ``load_test``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):
    # Run as a script, Python puts bench/ first on sys.path, where this file would shadow the serve/ package;
    # Ray also hands the driver's script folder to every worker, so the Serve replicas would import this file
    # as ``serve``. Drop bench/ from the path and import from the repository root.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "configs"
APP = "faceforge-bench"
PRESETS = {
    # preset: (training config it comes from, image side, codec, text encoder, default steps)
    "mmface-dit-tiny": ("mmface_dit_tiny.yaml", 64, "pixel", "minilm", 10),
    "mmface-dit-xl": ("mmface_dit_xl_256_rfm.yaml", 256, "pixel:8", "minilm", 28),
}
PROMPTS = [
    "a smiling young woman with long wavy red hair and green eyes",
    "an old man with a grey beard, bushy eyebrows and round glasses",
    "a man in his thirties with short black hair and a stubble beard",
    "a woman with a blond bob haircut, pale skin and pink lipstick",
]
MASK_EVERY = 2  # every other request carries a face mask


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench serve {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mmface-dit-tiny", choices=sorted(PRESETS))
    parser.add_argument("--model-dir", help="a weights folder (config.json + safetensors) to serve instead")
    parser.add_argument("--data", help="a prepared folder whose codec, text encoder and size the model takes")
    parser.add_argument("--codec", help="codec spec for random weights (default: the preset's, see above)")
    parser.add_argument("--text", help="text encoder spec for random weights (default: minilm)")
    parser.add_argument("--depth", type=int, help="number of blocks (default: the preset's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--steps", type=int, help="sampler steps per image (default: 10 tiny, 28 XL)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the paper's 7.5)")
    parser.add_argument("--concurrency", help="client concurrency levels, comma-separated (default 1,8,32)")
    parser.add_argument("--per-client", type=int, help="requests per level: max(this x c, --min) (default 4)")
    parser.add_argument("--min", type=int, dest="min_requests", help="fewest requests per level (default 16)")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched deployment")
    parser.add_argument("--batch-wait", type=float, default=None, help="batch_wait_timeout_s (default: the app's)")
    parser.add_argument("--load-requests", type=int, help="requests of the load test (default 200)")
    parser.add_argument("--load-concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads of the replica and the bare loop (CPU)")
    parser.add_argument("--rounds", type=int, help="interleaved bare/Serve rounds of the ratios (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke size: concurrency 1 and 8, few requests")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (registry, weights)")
    args = parser.parse_args(argv)
    # what a flag leaves open: the full run's numbers, or the smoke test's with --quick
    sizes = ("1,8", 1, 8, 20, 1) if args.quick else ("1,8,32", 4, 16, 200, 3)
    for name, value in zip(("concurrency", "per_client", "min_requests", "load_requests", "rounds"), sizes):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.levels = sorted({int(c) for c in args.concurrency.split(",")})
    return args


# ------------------------------------------------------------------------------------------------ setup


def random_weights(args: argparse.Namespace, folder: Path) -> Path:
    """A weights folder as the trainer writes it, for the preset with random weights (perturbed from their
    initialisation, so zero-initialised output layers still depend on their inputs)."""
    import torch

    from modeling.codecs import load_codec
    from modeling.text_encoders import load_text_encoder
    from pipelines.train.config import load_config
    from pipelines.train.loop import save_serving_weights
    from pipelines.train.tasks import make_task

    config_file, size, codec_spec, text_spec, _ = PRESETS[args.model]
    if args.data:
        from pipelines.data.prepare import load_manifest

        manifest = load_manifest(args.data)
    else:
        # what prepare records of its codec and text encoder, without preparing anything: nothing served reads
        # the dataset, the model only needs the codec's latent shape and the encoder's widths
        codec = load_codec(args.codec or codec_spec)
        text = load_text_encoder(args.text or text_spec)
        manifest = {
            "targets": ["mmface"],
            "size": size,
            "codec": codec.describe(),
            "text_encoder": text.describe(),
            "latent_shape": list(codec.latent_shape(size)),
        }
    codec_info, text_info = manifest["codec"], manifest["text_encoder"]
    overrides = [
        f"data={args.data or folder}",
        f"model.options.latent_channels={codec_info['latent_channels']}",
        f"model.options.text_dim={text_info['seq_dim']}",
        f"model.options.pooled_dim={text_info['pooled_dim']}",
        f"model.sample_steps={args.steps}",
        f"model.sample_guidance={args.guidance}",
    ]
    if args.depth:
        overrides.append(f"model.options.depth={args.depth}")
    config = load_config(CONFIGS / config_file, overrides)
    task = make_task(config, manifest)
    torch.manual_seed(0)
    model = task.build_model("cpu")
    trainable = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn_like(p))
            trainable[name] = p.detach()
    save_serving_weights(folder, task, model, trainable, ema=None)
    return folder


def register(weights: Path, root: Path) -> str:
    """Publish ``weights`` into a fresh SQLite MLflow registry under ``root``, as ``faceforge publish`` does for a
    trained run; the registered version's id (``name/VERSION``)."""
    from mlflow import MlflowClient

    from modeling.checkpoints import STATE_FILE, WEIGHTS_DIR
    from pipelines.train.publish import publish
    from pipelines.train.run import RUN_TAG, artifact_location

    uri = os.environ["MLFLOW_TRACKING_URI"]
    run_dir = (root / "runs" / "bench").resolve()
    checkpoint = run_dir / "checkpoint_000000"
    target = checkpoint / WEIGHTS_DIR
    if weights.resolve() != target.resolve():
        target.mkdir(parents=True)
        for path in weights.iterdir():
            if path.is_file():
                try:  # an XL folder is ~5 GiB: link, do not copy, when the file system allows it
                    os.link(path, target / path.name)
                except OSError:
                    shutil.copy2(path, target / path.name)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 0, "epoch": 0, "ema_updates": 0, "world": None}))
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench-serve", artifact_location(uri))
    client.create_run(experiment, run_name="bench", tags={RUN_TAG: "bench", "faceforge.run_dir": str(run_dir)})
    published = publish("bench", storage=str(run_dir.parent))
    return f"{published['registered_model']}/{published['version']}"


def face_mask(size: int):
    """A plausible 19-class label map: skin, hair, two eyes, a mouth, cloth."""
    import numpy as np

    labels = np.zeros((size, size), np.uint8)
    q = size // 8
    labels[2 * q : 7 * q, 2 * q : 6 * q] = 1  # skin
    labels[q : 2 * q, 2 * q : 6 * q] = 13  # hair
    labels[3 * q : 4 * q, 3 * q - q // 2 : 3 * q + q // 2] = 4  # left eye
    labels[3 * q : 4 * q, 5 * q - q // 2 : 5 * q + q // 2] = 5  # right eye
    labels[5 * q + q // 2 : 6 * q, 3 * q : 5 * q] = 11  # mouth
    labels[7 * q :, :] = 18  # cloth
    return labels


def png_b64(array) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def prompts(long: bool) -> list[str]:
    """The fixed prompts; ``long``: each one all four captions, rotated, so MiniLM fills its 77-token window as
    CLIP-H always does (see the module docstring)."""
    if not long:
        return PROMPTS
    return [". ".join((PROMPTS[i:] + PROMPTS[:i]) * 2) for i in range(len(PROMPTS))]


# ------------------------------------------------------------------------------------------------ measuring


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 4) if values else None


def drive(url: str, bodies: list[dict], concurrency: int) -> dict:
    """``bodies`` as HTTP requests from ``concurrency`` client threads, each sending its next request when its
    previous one is answered (a closed loop: the server sees exactly ``concurrency`` requests in flight).

    ``cpu``: CPU cores each part used over the level (CPU seconds / wall seconds): the model replica, the ingress,
    the HTTP proxy, the client threads, the rest of Ray (controller, raylet, GCS, the driver's own threads), and
    ``other``: every process on the machine that is not this bench's (what else ran). ``cpu_ms_per_image``: the
    same as CPU milliseconds per answered image."""
    import requests

    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    client_cpu = []

    def client() -> list[tuple[float, int | None, int | None]]:
        session = requests.Session()
        done = []
        cpu = time.thread_time()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                with lock:
                    client_cpu.append(time.thread_time() - cpu)
                return done
            started = time.perf_counter()
            try:
                answer = session.post(f"{url}/v1/generate", json=bodies[i], timeout=600)
                status = answer.status_code
                # the JSON answer is parsed (its base64 PNG stays a string): the client decodes no image
                batch = answer.json().get("batch_size") if status == 200 else None
            except (requests.RequestException, ValueError):
                status = batch = None
            done.append((time.perf_counter() - started, status, batch))

    before = cpu_snapshot()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = [o for f in [pool.submit(client) for _ in range(concurrency)] for o in f.result()]
    wall = time.perf_counter() - started
    after = cpu_snapshot()
    ok = [(seconds, batch) for seconds, status, batch in outcomes if status == 200]
    latencies = [seconds for seconds, _ in ok]
    # each answer says the size of the sampler batch its image ran in: a batch of b images is seen b times,
    # so the number of sampler calls is sum(1/b) and the mean images per call is images / that
    calls = sum(1 / b for _, b in ok if b)
    cpu = {role: after[role] - before[role] for role in after}
    cpu["client"] = sum(client_cpu)
    cpu["ray"] = cpu.pop("driver") - cpu["client"] + cpu["ray"]  # the driver's Ray threads, log printing
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": len(bodies) - len(ok),
        "images_per_s": round(len(ok) / wall, 4),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "mean_batch": round(len(ok) / calls, 3) if calls else None,
        "cpu": {role: round(seconds / wall, 3) for role, seconds in cpu.items()},
        "cpu_ms_per_image": {role: round(1e3 * seconds / len(ok), 2) for role, seconds in cpu.items()} if ok else None,
    }


ROLES = {"FaceModel": "replica", "FaceforgeIngress": "ingress", "ProxyActor": "proxy"}


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far: this process (``driver``: the client threads and the driver's Ray threads), its Ray
    processes by role (``replica``, ``ingress``, ``proxy``, ``ray`` for the rest: controller, raylet, GCS,
    dashboard), and ``other``: the whole machine's busy time less all of those (what else ran)."""
    import psutil

    totals = dict.fromkeys(("driver", "replica", "ingress", "proxy", "ray"), 0.0)
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            title = " ".join(process.cmdline()[:1])
        except psutil.Error:  # gone between the listing and the read
            continue
        role = "driver" if process.pid == me.pid else next((r for k, r in ROLES.items() if k in title), "ray")
        totals[role] += times.user + times.system
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + getattr(machine, "irq", 0) + getattr(machine, "softirq", 0)
    totals["other"] = busy - sum(totals.values())
    return totals


class BareLoop:
    """``FaceGenerator.generate`` in this process on the bench's requests in chunks of a batch size, each image
    then encoded as a PNG as the replica does (what a Serve answer holds)."""

    def __init__(self, weights: Path, device: str, requests: list, steps: int, guidance: float) -> None:
        from modeling.generator import FaceGenerator

        self.generator = FaceGenerator(weights, device)
        self.requests, self.steps, self.guidance = requests, steps, guidance
        self.warm: set[int] = set()

    def run(self, batch: int) -> dict:
        """``images_per_s``, ``png_share`` (the part of the time spent encoding PNGs), ``cpu_ms_per_image`` (this
        process's CPU time, all its threads: Ray's idle driver threads included) and ``cpu`` (cores used)."""
        from serve.model import _png

        if batch not in self.warm:  # allocator, kernels, MiniLM
            [_png(image) for image in self.generator.generate(self.requests[:batch], self.steps, self.guidance)]
            self.warm.add(batch)
        png_s = 0.0
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(self.requests), batch):
            images = self.generator.generate(self.requests[i : i + batch], self.steps, self.guidance)  # synchronised
            encoding = time.perf_counter()
            [_png(image) for image in images]
            png_s += time.perf_counter() - encoding
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        return {
            "images_per_s": round(len(self.requests) / wall, 4),
            "png_share": round(png_s / wall, 4),
            "cpu_ms_per_image": round(1e3 * cpu / len(self.requests), 2),
            "cpu": round(cpu / wall, 3),
        }


def serve_settings(args: argparse.Namespace, uri: str, model_id: str, root: Path, max_batch: int) -> dict:
    top = max(args.levels + [args.load_concurrency])
    admit = max(64, 2 * top)  # no level of this bench may see a 503: it measures speed, not admission
    batching = {"max_batch_size": max_batch}
    if args.batch_wait is not None:
        batching["batch_wait_timeout_s"] = args.batch_wait
    return {
        "tracking_uri": uri,
        "default_model": model_id,
        "model_cache": str(root / "model-cache"),
        "limits": {"max_steps": max(100, args.steps)},
        "batching": batching,
        "capacity": {
            "ingress_max_ongoing": admit,
            "ingress_max_queued": admit,
            "model_max_ongoing": admit,
            "model_max_queued": admit,
            # the replica's CPU share is a scheduling label: its torch threads come from OMP_NUM_THREADS; the
            # batched and the unbatched deployments both stay up (and share the GPU), never driven at once
            "model_num_cpus": 0.5 if args.device == "cpu" else 1.0,
            "model_num_gpus": 0.5 if args.device == "cuda" else 0.0,
        },
    }


def deploy(settings: dict, name: str, url: str, warm: list[dict]) -> None:
    """Deploy the app with ``settings`` as application ``name`` at ``url``'s path and warm it: the first request
    loads the model into the replica, then one full batch at the batch size runs every code path once before
    anything is timed."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(settings), name=name, route_prefix="/" + url.split("/", 3)[3])
    first = drive(url, warm[:1], 1)
    if first["errors"]:
        raise RuntimeError(f"the deployment does not answer: {first}")
    batch = settings["batching"]["max_batch_size"]
    drive(url, warm[: max(batch, 2)], max(batch, 2))
    log(f"{name} deployed and warm (max_batch_size {batch})")


def median_range(values: list[float]) -> tuple[float, list[float]]:
    import statistics

    return round(statistics.median(values), 3), [round(min(values), 3), round(max(values), 3)]


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    # the replica's torch threads, equal to the bare loop's: set before torch is imported here and before Ray
    # starts, whose workers inherit it (Ray sets OMP_NUM_THREADS only where it is unset, to the actor's whole
    # CPUs, at least 1: a 0.5-CPU replica would get 1 thread whatever the bare loop had)
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    os.environ["OMP_NUM_THREADS"] = str(threads)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.steps = args.steps or PRESETS[args.model][4]

    from modeling.diffusion import SamplerConfig
    from modeling.generator import GenerationRequest, read_weights_config
    from pipelines.ray_runtime import ensure_ray, stop_ray
    from serve.settings import Batching

    torch.set_num_threads(threads)
    if args.guidance is None:
        args.guidance = SamplerConfig().guidance_scale
    if args.batch_wait is None:
        args.batch_wait = Batching().batch_wait_timeout_s
    root = Path(tempfile.mkdtemp(prefix="faceforge-bench-serve-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        if args.model_dir:
            weights = Path(args.model_dir)
        else:
            log(f"writing random {args.model} weights")
            weights = random_weights(args, root / "weights")
        config = read_weights_config(weights)
        size = int(config["size"])
        depth = (config.get("model") or {}).get("depth")
        model_id = register(weights, root)
        log(f"registered {model_id} ({size} px, depth {depth})")

        texts = prompts(long=config.get("preset") == "mmface-dit-xl")
        labels = face_mask(size)
        mask = png_b64(labels)
        top = max(args.levels)
        n_bare = max(args.per_client * top, args.min_requests)

        def body(i: int) -> dict:
            b = {"prompt": texts[i % len(texts)], "seed": i, "steps": args.steps, "guidance": args.guidance}
            return b | ({"mask": mask} if i % MASK_EVERY else {})

        bare_requests = [
            GenerationRequest(prompt=texts[i % len(texts)], mask=labels if i % MASK_EVERY else None, seed=i)
            for i in range(n_bare)
        ]
        bare = BareLoop(weights, args.device, bare_requests, args.steps, args.guidance)
        base = f"http://127.0.0.1:{free_port()}"
        ensure_ray(num_cpus=max(2, threads), local=True)
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": int(base.rsplit(":", 1)[1])})
        log(f"Ray Serve on {base}")
        urls = {"batched": f"{base}/batched", "unbatched": f"{base}/unbatched"}
        results, rounds, load_test = [], [], None
        try:
            for mode, max_batch in (("batched", args.batch), ("unbatched", 1)):
                settings = serve_settings(args, uri, model_id, root, max_batch)
                deploy(settings, f"{APP}-{mode}", urls[mode], [body(i) for i in range(64)])
            for mode in ("batched", "unbatched"):
                for c in args.levels:
                    n = max(args.per_client * c, args.min_requests)
                    result = {"mode": mode, **drive(urls[mode], [body(i) for i in range(n)], c)}
                    results.append(result)
                    log(f"{mode}, concurrency {c}: {json.dumps(result)}")
                if mode == "batched":
                    n, c = args.load_requests, args.load_concurrency
                    load_test = drive(urls[mode], [body(i) for i in range(n)], c)
                    log(f"load test: {json.dumps(load_test)}")
            # the ratios: the bare loop and Serve at the highest concurrency, interleaved in rounds on the same
            # requests, so that what else runs on a shared machine weighs on both sides of each ratio alike
            served = [body(i) for i in range(n_bare)]
            for k in range(args.rounds):
                one = {f"bare_{args.batch}": bare.run(args.batch)}
                one["batched"] = drive(urls["batched"], served, top)
                one["bare_1"] = bare.run(1)
                one["unbatched"] = drive(urls["unbatched"], served, top)
                rounds.append(one)
                log(f"round {k + 1}/{args.rounds}: " + json.dumps({key: v["images_per_s"] for key, v in one.items()}))
        finally:
            serve.shutdown()
            stop_ray()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def ratios(numerator: str, denominator: str, field: str = "images_per_s") -> tuple[float, list[float]]:
        return median_range([r[numerator][field] / r[denominator][field] for r in rounds])

    full = f"bare_{args.batch}"
    serve_vs_bare = ratios("batched", full)
    speedup = ratios("batched", "unbatched")
    unbatched_vs_bare = ratios("unbatched", "bare_1")
    # CPU per image: the bare loop's over the replica's, and over the whole Serve side's (client included)
    replica_cpu = median_range(
        [r[full]["cpu_ms_per_image"] / r["batched"]["cpu_ms_per_image"]["replica"] for r in rounds]
    )
    side = [sum(v for role, v in r["batched"]["cpu_ms_per_image"].items() if role != "other") for r in rounds]
    serve_cpu = median_range([r[full]["cpu_ms_per_image"] / total for r, total in zip(rounds, side)])
    bare_rates = {str(b): median_range([r[f"bare_{b}"]["images_per_s"] for r in rounds])[0] for b in (1, args.batch)}
    result = {
        "bench": "serve",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": args.model if not args.model_dir else config.get("preset") or config["arch"],
        "model_dir": args.model_dir,
        "size": size,
        "depth": depth,
        "codec": config["codec"]["name"],
        "text_encoder": config["text_encoder"]["name"],
        "steps": args.steps,
        "guidance": args.guidance,
        "threads": threads,
        "max_batch_size": args.batch,
        "batch_wait_timeout_s": args.batch_wait,
        "results": results,
        "rounds": rounds,
        "bare": bare_rates,
        "batching_speedup": speedup[0],
        "batching_speedup_range": speedup[1],
        "batching_speedup_at": top,
        "serve_vs_bare": serve_vs_bare[0],
        "serve_vs_bare_range": serve_vs_bare[1],
        "unbatched_vs_bare": unbatched_vs_bare[0],
        "unbatched_vs_bare_range": unbatched_vs_bare[1],
        "replica_cpu_vs_bare": replica_cpu[0],
        "serve_cpu_vs_bare": serve_cpu[0],
        "serve_cpu_vs_bare_range": serve_cpu[1],
        "png_share": rounds[0][full]["png_share"],
        "load_test": load_test,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
