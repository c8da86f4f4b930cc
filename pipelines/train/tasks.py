"""Which ``Task`` trains a run: the one switch between the two architectures."""

from __future__ import annotations

from pipelines.train.config import TrainConfig
from pipelines.train.mmface_task import MMFaceDiTTask
from pipelines.train.mogle_task import FaceMoGLETask
from pipelines.train.task import Task


def make_task(config: TrainConfig, manifest: dict) -> Task:
    task: Task = (MMFaceDiTTask if config.model.arch == "mmface-dit" else FaceMoGLETask)(config, manifest)
    target = "mmface" if config.model.arch == "mmface-dit" else "mogle"
    if target not in manifest["targets"]:
        raise ValueError(
            f"{config.data.path}: prepared for targets {manifest['targets']}, but {config.model.arch} needs "
            f"'{target}'; re-run `faceforge data prepare ... --targets {target}`"
        )
    return task
