"""What the driver checks before a single worker starts: the model fits the data, the batch fits the split, and
the cluster can place the workers. Each problem is one line naming the setting and the fix; before these checks
a mismatch surfaced only after ~50 s of worker retries and a traceback, and ``workers=64`` on a laptop hung.
"""

from __future__ import annotations

from pipelines.train.config import TrainConfig

# the data resolutions each preset is meant for (the positional tables and the recipe were sized for them);
# another size is refused unless ``model.any_size: true`` says it is on purpose
PRESET_SIZES: dict[str, tuple[int, ...]] = {
    "mmface-dit-tiny": (32, 64),
    "mmface-dit-xl": (256, 512),
    "face-mogle-tiny": (32, 64),
    "face-mogle-flux-dev": (512, 1024),
}


def model_dims(config: TrainConfig, task) -> dict[str, int]:
    """Latent channels, text token width and pooled width the configured model expects."""
    cfg = task.model_config
    if config.model.arch == "mmface-dit":
        return {"latent channels": cfg.latent_channels, "text width": cfg.text_dim, "pooled width": cfg.pooled_dim}
    return {
        "latent channels": cfg.latent_channels,
        "text width": cfg.flux.joint_attention_dim,
        "pooled width": cfg.flux.pooled_projection_dim,
    }


def check_model_fits_data(config: TrainConfig, manifest: dict, task) -> None:
    data = {
        "latent channels": manifest["latent_shape"][0],
        "text width": manifest["text_dims"]["seq"],
        "pooled width": manifest["text_dims"]["pooled"],
    }
    expected = model_dims(config, task)
    for what, wanted in expected.items():
        if data[what] != wanted:
            source = (
                manifest.get("codec", {}).get("spec")
                if what == "latent channels"
                else manifest.get("text_encoder", {}).get("spec")
            )
            raise ValueError(
                f"{config.data.path}: {what} {data[what]} (prepared with {source}) do not fit model.preset="
                f"{config.model.preset}, which needs {wanted}; prepare the data with the preset's codec and text "
                "encoder, or pick a preset that fits"
            )
    sizes = PRESET_SIZES.get(config.model.preset)
    if sizes and manifest["size"] not in sizes and not config.model.any_size:
        raise ValueError(
            f"{config.data.path}: {manifest['size']}x{manifest['size']} data, but model.preset={config.model.preset} "
            f"is meant for {' or '.join(f'{s}x{s}' for s in sizes)}; prepare at that size, or set "
            "model.any_size=true to train it anyway"
        )


def check_batch_fits_split(config: TrainConfig, manifest: dict) -> None:
    split = manifest.get("counts", {}).get("splits", {}).get(config.data.split, {})
    rows = split.get("n_written")
    if rows is None:
        return
    workers = config.scaling.max_workers  # the most workers, each wanting a micro-batch
    per_step = config.data.batch_size * workers
    if rows < per_step:
        raise ValueError(
            f"{config.data.path}: the '{config.data.split}' split has {rows} rows, fewer than one step's batch "
            f"({config.data.batch_size} per worker x {workers} workers = {per_step}); lower "
            "data.batch_size or scaling.num_workers"
        )


def check_cluster_can_place(config: TrainConfig, local: bool) -> None:
    """On the private local Ray, refuse workers that cannot all run (Ray would wait forever); on a cluster
    (which may autoscale) say what the run waits for. An elastic run (``num_workers: [min, max]``) needs ``min``
    to start; it says when fewer than ``max`` can be placed now."""
    import sys

    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    s = config.scaling
    workers = s.min_workers
    placeable = int(gpus) if s.use_gpu else max(1, int(cpus))
    if s.elastic and workers <= placeable < s.max_workers:
        print(
            f"[faceforge] scaling.num_workers={s.num_workers}: room for {placeable} worker(s) now; starting with "
            f"what can be placed, growing towards {s.max_workers} as the cluster does",
            file=sys.stderr,
        )
    problems = []
    if config.scaling.use_gpu and workers > gpus:
        problems.append(f"{workers} workers with a GPU each, and Ray has {gpus:g} GPU(s)")
    # each worker is a process holding the model: more than one per core only contend, and leave_cpu_headroom
    # would hand each a sliver of a CPU
    if not config.scaling.use_gpu and workers > max(1, cpus):
        problems.append(f"{workers} workers and Ray has {cpus:g} CPUs")
    if not problems:
        return
    if local:
        raise ValueError(
            f"scaling.num_workers={s.num_workers}: {'; '.join(problems)}; this machine cannot place them. Use workers<="
            f"{max(1, int(gpus if config.scaling.use_gpu else cpus))} or submit to a cluster"
        )
    print(f"[faceforge] waiting for resources: {'; '.join(problems)} (the cluster may scale up)", file=sys.stderr)


def preflight(config: TrainConfig, manifest: dict) -> None:
    """The checks that need no Ray: model vs data, batch vs split."""
    from pipelines.train.tasks import make_task

    check_model_fits_data(config, manifest, make_task(config, manifest))
    check_batch_fits_split(config, manifest)
