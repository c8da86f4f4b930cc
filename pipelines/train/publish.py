"""``faceforge publish RUN``: a checkpoint's serving weights as a registered MLflow model version.

The checkpoint is logged into the run's own MLflow run as a pyfunc model (``serve.pyfunc``) and registered
under the architecture's name: ``faceforge-mmface-dit`` or ``faceforge-face-mogle``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.train.checkpoints import WEIGHTS_DIR, latest_checkpoint, resolve_checkpoint
from pipelines.train.run import RUN_TAG, tracking_uri

REGISTERED_NAMES = {"mmface-dit": "faceforge-mmface-dit", "face-mogle": "faceforge-face-mogle"}


def publish(run: str, storage: str = "runs", checkpoint: str | None = None) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from serve.generator import read_weights_config
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
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=f"model-step{step}",
            python_model=FaceforgePyfunc(),
            artifacts={"weights": str(weights)},
            pip_requirements=["faceforge"],
            registered_model_name=name,
        )
    version = info.registered_model_version
    client.set_model_version_tag(name, str(version), "checkpoint", str(ckpt))
    client.set_model_version_tag(name, str(version), "step", str(step))
    return {
        "registered_model": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "checkpoint": str(ckpt),
    }


def publish_from_cli(args: argparse.Namespace) -> int:
    print(json.dumps(publish(args.run, args.storage, args.checkpoint), indent=2))
    return 0
