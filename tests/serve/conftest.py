"""Registered model versions for the Serve tests: real checkpoint folders, published through ``faceforge publish``.

The weights are a tiny model's, briefly perturbed from their initialisation (no training: serving does not
care what the model learned, only that it answers, batches and swaps correctly); everything around them is
what the trainer writes: ``weights/`` (config.json + safetensors), ``trainer_state.json``, an MLflow run
tagged with the run folder, and a registered pyfunc version.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(prepared: Path, runs: Path, name: str, config_file: str, seed: int, *overrides: str) -> Path:
    """``runs/name/checkpoint_000000`` as the trainer lays it out, with an MLflow run that publish can find."""
    from modeling.checkpoints import STATE_FILE, WEIGHTS_DIR
    from pipelines.data.prepare import load_manifest
    from pipelines.train.config import load_config
    from pipelines.train.loop import save_serving_weights
    from pipelines.train.run import open_mlflow_run
    from pipelines.train.tasks import make_task

    config = load_config(
        CONFIGS / config_file,
        [f"data={prepared}", f"storage={runs}", f"name={name}", "model.sample_steps=4", *overrides],
    )
    manifest = load_manifest(prepared)
    task = make_task(config, manifest)
    torch.manual_seed(seed)
    model = task.build_model("cpu")
    trainable = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))  # zero-initialised output layers now depend on the inputs
                trainable[n] = p.detach().clone()
    checkpoint = runs / name / "checkpoint_000000"
    save_serving_weights(checkpoint / WEIGHTS_DIR, task, model, trainable, ema=None)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1, "epoch": 1, "ema_updates": 0, "world": None}))
    open_mlflow_run(config, manifest, (runs / name).resolve())
    return checkpoint


@pytest.fixture(scope="module")
def registered(prepared, tmp_path_factory) -> dict:
    """Two MMFace-DiT versions and one Face-MoGLE version in a fresh MLflow registry."""
    from pipelines.train.publish import publish

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        write_checkpoint(prepared, runs, "mm-a", "mmface_dit_tiny.yaml", 1)
        write_checkpoint(prepared, runs, "mm-b", "mmface_dit_tiny.yaml", 2)
        write_checkpoint(prepared, runs, "base", "flux_base_tiny.yaml", 3)
        base = runs / "base" / "checkpoint_000000"
        write_checkpoint(prepared, runs, "mogle", "face_mogle_tiny.yaml", 4, f"base_from={base}")
        versions = {
            "mm1": publish("mm-a", storage=str(runs)),
            "mm2": publish("mm-b", storage=str(runs)),
            "mogle1": publish("mogle", storage=str(runs)),
        }
    return {"uri": uri, "runs": runs, **versions}
