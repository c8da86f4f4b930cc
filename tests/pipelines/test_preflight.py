"""Settings that cannot work are refused by the driver in one line, before a worker starts or an MLflow run opens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch) -> Path:
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return db


def _train(prepared: Path, tmp_path: Path, *overrides: str) -> int:
    from pipelines.cli import main

    argv = ["train", str(CONFIGS / "mmface_dit_tiny.yaml"), f"data={prepared}", f"storage={tmp_path / 'runs'}"]
    return main([*argv, "name=refused", "max_steps=2", *overrides])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (("preset=mmface-dit-xl",), ["latent channels 12", "pixel:2", "mmface-dit-xl", "needs 16"]),
        (("batch=1000",), ["'train' split has", "1000 per worker", "data.batch_size"]),
        (("workers=64", "batch=1"), ["scaling.num_workers=64", "CPUs", "workers<="]),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_worker(
    ray_local, prepared, tmp_path, mlflow_db, capsys, monkeypatch, overrides, words
):
    import pipelines.train.run

    def no_trainer(*args, **kwargs):  # what starts Ray Train's workers: the refusal must come before it
        raise AssertionError("a trainer was built: the settings got past the pre-flight checks")

    monkeypatch.setattr(pipelines.train.run, "build_trainer", no_trainer)
    code = _train(prepared, tmp_path, *overrides)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("faceforge: error:"), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not (tmp_path / "runs" / "refused").exists()
    if mlflow_db.exists():  # and no MLflow run was opened (let alone left RUNNING)
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{mlflow_db}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(experiments)


def test_data_of_another_size_than_the_preset_is_refused_unless_asked_for(prepared, tmp_path):
    from pipelines.data.prepare import load_manifest
    from pipelines.train.config import load_config
    from pipelines.train.preflight import check_model_fits_data
    from pipelines.train.tasks import make_task

    copy = tmp_path / "prepared-128"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text()) | {"size": 128}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    config = load_config(CONFIGS / "mmface_dit_tiny.yaml", [f"data={copy}"])
    manifest = load_manifest(copy)
    with pytest.raises(ValueError, match=r"128x128 data, but model.preset=mmface-dit-tiny is meant for 32x32 or 64x64"):
        check_model_fits_data(config, manifest, make_task(config, manifest))
    config.model.any_size = True
    check_model_fits_data(config, manifest, make_task(config, manifest))
