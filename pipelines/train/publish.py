"""``faceforge publish RUN``: a checkpoint's serving weights as a registered MLflow model version.

The checkpoint is logged into the run's own MLflow run as a pyfunc model (``serve.pyfunc``) and registered
under the architecture's name: ``faceforge-mmface-dit`` or ``faceforge-face-mogle``. ``RUN`` may also be a
weights folder that no run trained (``faceforge import`` writes one): it is logged into a new run of the
``imported`` experiment, tagged with the folder it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from modeling import storage as shared
from modeling.checkpoints import STATE_FILE, WEIGHTS_DIR, latest_checkpoint, resolve_checkpoint, weights_dir
from pipelines.train.run import artifact_location, mlflow_run_of
from serve.settings import REGISTERED_PREFIX, check_tracking_server, tracking_uri

REGISTERED_NAMES = {arch: REGISTERED_PREFIX + arch for arch in ("mmface-dit", "face-mogle")}
IMPORTED_EXPERIMENT = "imported"


def is_weights_folder(path: str | Path) -> bool:
    """A folder of serving weights that is not a training checkpoint (no trainer state beside it)."""
    path = Path(path)
    return (weights_dir(path) / "config.json").is_file() and not (path / "trainer_state.json").is_file()


def _imported_run(client, weights: Path, config: dict) -> str:
    """A new MLflow run in the ``imported`` experiment that records where the weights came from (made through
    the client: ``mlflow.set_experiment`` would change the process's active experiment under other runs)."""
    experiment = client.get_experiment_by_name(IMPORTED_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(IMPORTED_EXPERIMENT, artifact_location(tracking_uri()))
    )
    tags = {"faceforge.source": str(weights), "faceforge.arch": config["arch"]}
    if config.get("imported_from"):
        tags["faceforge.imported_from"] = json.dumps(config["imported_from"])[:5000]
    run = client.create_run(experiment_id, run_name=weights.parent.name, tags=tags)
    client.log_param(run.info.run_id, "arch", config["arch"])
    client.log_param(run.info.run_id, "size", config.get("size"))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def publish(
    run: str,
    storage: str = "runs",
    checkpoint: str | None = None,
    alias: str | None = None,
    examples_from: str | None = None,
) -> dict:
    """Register the checkpoint's serving weights; ``alias`` (e.g. "champion") then points at the new version.

    The version carries example conditions (``modeling.examples``) drawn from the held-out split of
    ``examples_from`` (a prepared dataset), by default the data the run trained on; a Face-MoGLE version
    without them cannot generate from text alone (it has no default layout)."""
    import mlflow
    from mlflow import MlflowClient

    from modeling.examples import save_examples
    from modeling.generator import accepted_inputs, read_weights_config, sampler_defaults
    from serve.pyfunc import FaceforgePyfunc

    uri = tracking_uri()
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if checkpoint is None and is_weights_folder(run):
        weights = weights_dir(run).resolve()
        config = read_weights_config(weights)
        ckpt, step, run_id = weights, "imported", _imported_run(client, weights, config)
    else:
        run_dir = shared.check_reachable(storage) / run  # a local folder or a bucket
        # every file checked against its manifest's sha256: a damaged checkpoint named here is refused, and the
        # run's newest damaged ones are passed over (each reported) for the newest intact one
        ckpt = resolve_checkpoint(checkpoint, deep=True) if checkpoint else latest_checkpoint(run_dir, deep=True)
        weights = ckpt / WEIGHTS_DIR
        config = json.loads(shared.read_text(weights / "config.json"))
        run_id = mlflow_run_of(run_dir, uri)
        step = json.loads(shared.read_text(ckpt / STATE_FILE))["step"]
    name = REGISTERED_NAMES[config["arch"]]
    base = config.get("base_from")
    examples = _examples(client, run_id, config, examples_from)
    with tempfile.TemporaryDirectory(prefix="faceforge-publish-") as staging:
        # MLflow stores each artifact under its folder's own name: stage them under the names we read back; the
        # tracking server (--serve-artifacts) then holds them, so replicas on any node load the version
        artifacts = {"weights": _stage(weights, Path(staging) / "weights")}
        if examples is not None:
            artifacts["examples"] = str(save_examples(Path(staging) / "examples", examples))
        if base and shared.is_file(weights_dir(base) / "config.json"):
            # a Face-MoGLE LoRA on a faceforge-trained base: the base travels with the model, so a server that
            # never saw this run's folders can load it
            artifacts["base"] = _stage(weights_dir(base), Path(staging) / "base")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=f"model-step{step}" if step != "imported" else "model-imported",
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
        **({"text_guidance": str(defaults.text_guidance)} if defaults.text_guidance is not None else {}),
        "examples": str(len(examples.examples)) if examples else "0",
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
        "examples": len(examples.examples) if examples else 0,
    }


def _examples(client, run_id: str, config: dict, examples_from: str | None):
    """Example conditions for the new version: from ``examples_from``, else the held-out split of the data the
    run trained on; None (said on stderr) when neither is readable here."""
    from modeling.generator import accepted_inputs
    from pipelines.data.examples import held_out_examples

    params = client.get_run(run_id).data.params
    data = examples_from or params.get("data.path")
    split = params.get("data.holdout_split", "test")
    if data is None:
        print("faceforge publish: no example conditions (no training data recorded); pass --examples-from PREPARED",
              file=sys.stderr)  # fmt: skip
        return None
    try:
        return held_out_examples(data, split=split, sketches=accepted_inputs(config["arch"])["sketch"])
    except (OSError, ValueError) as error:
        if examples_from:
            raise
        print(f"faceforge publish: no example conditions ({error}); pass --examples-from PREPARED", file=sys.stderr)
        return None


def _stage(source: shared.Where, target: Path) -> str:
    """The weights files of ``source`` hard-linked (or copied) into ``target``; from object storage, downloaded."""
    if shared.is_remote(source):
        return str(shared.download_dir(source, target))
    source = Path(source)
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)
    return str(target)


def publish_from_cli(args: argparse.Namespace) -> int:
    print(json.dumps(publish(args.run, args.storage, args.checkpoint, args.alias, args.examples_from), indent=2))
    return 0
