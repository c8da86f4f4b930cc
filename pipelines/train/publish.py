"""``faceforge publish RUN``: a checkpoint's serving weights as a registered MLflow model version.

The checkpoint is logged into the run's own MLflow run as a pyfunc model (``serve.pyfunc``) and registered
under the architecture's name: ``faceforge-mmface-dit`` or ``faceforge-face-mogle``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from modeling.checkpoints import WEIGHTS_DIR, latest_checkpoint, resolve_checkpoint, weights_dir
from pipelines.train.run import RUN_TAG
from serve.settings import REGISTERED_PREFIX, tracking_uri

REGISTERED_NAMES = {arch: REGISTERED_PREFIX + arch for arch in ("mmface-dit", "face-mogle")}


def publish(run: str, storage: str = "runs", checkpoint: str | None = None, alias: str | None = None) -> dict:
    """Register the checkpoint's serving weights; ``alias`` (e.g. "champion") then points at the new version."""
    import mlflow
    from mlflow import MlflowClient

    from modeling.generator import accepted_inputs, read_weights_config, sampler_defaults
    from serve.pyfunc import FaceforgePyfunc

    run_dir = (Path(storage) / run).resolve()
    ckpt = resolve_checkpoint(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    weights = ckpt / WEIGHTS_DIR
    config = read_weights_config(weights)
    name = REGISTERED_NAMES[config["arch"]]
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{RUN_TAG}` = '{run}' and tags.`faceforge.run_dir` = '{run_dir}'",
        max_results=1,
    )
    if not runs:
        raise FileNotFoundError(
            f"no MLflow run for {run} (trained into {run_dir}) at {uri}; is MLFLOW_TRACKING_URI the same?"
        )
    run_id = runs[0].info.run_id
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    base = config.get("base_from")
    with tempfile.TemporaryDirectory(prefix="faceforge-publish-") as staging:
        # MLflow stores each artifact under its folder's own name: stage them under the names we read back
        artifacts = {"weights": _stage(weights, Path(staging) / "weights")}
        if base and (weights_dir(base) / "config.json").is_file():
            # a Face-MoGLE LoRA on a faceforge-trained base: the base travels with the model, so a server that
            # never saw this run's folders can load it
            artifacts["base"] = _stage(weights_dir(base), Path(staging) / "base")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=f"model-step{step}",
                python_model=FaceforgePyfunc(),
                artifacts=artifacts,
                pip_requirements=["faceforge"],
                registered_model_name=name,
            )
    version = str(info.registered_model_version)
    defaults = sampler_defaults(config)
    tags = {
        "checkpoint": str(ckpt),
        "step": str(step),
        "arch": config["arch"],
        "size": str(config["size"]),
        "accepts": ",".join(k for k, v in accepted_inputs(config["arch"]).items() if v),
        "default_steps": str(defaults.steps),
        "default_guidance": str(defaults.guidance),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return {
        "registered_model": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "checkpoint": str(ckpt),
    }


def _stage(source: Path, target: Path) -> str:
    """The weights files of ``source`` hard-linked (or copied) into ``target``."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)
    return str(target)


def publish_from_cli(args: argparse.Namespace) -> int:
    print(json.dumps(publish(args.run, args.storage, args.checkpoint, args.alias), indent=2))
    return 0
