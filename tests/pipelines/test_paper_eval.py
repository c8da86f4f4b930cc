"""``faceforge eval --metrics paper`` end to end on tiny checkpoints (Ray Data, embedded judges, MLflow), ``--compare``,
and the per-batch scoring path agreeing with scoring the whole set at once."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.cli import main
from tests.serve.conftest import write_checkpoint


@pytest.fixture(scope="module")
def evaluated(prepared, tmp_path_factory) -> dict:
    """Two tiny MMFace-DiT runs, each evaluated through the command line on the 7 faces of the test split (--n 8)."""
    root = tmp_path_factory.mktemp("paper-eval")
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        outputs = {}
        for seed, name in enumerate(("mm-a", "mm-b")):
            write_checkpoint(prepared, runs, name, "mmface_dit_tiny.yaml", seed)
            out = root / f"{name}.json"
            argv = ["eval", name, "--storage", str(runs), "--data", str(prepared), "--metrics", "paper"]
            argv += ["--n", "8", "--batch", "4", "--judges", str(root / "no-judges"), "--out", str(out)]
            assert main(argv) == 0
            outputs[name] = json.loads(out.read_text())
        yield {"root": root, "results": outputs}


def test_paper_eval_writes_every_metric_to_json_and_mlflow(evaluated):
    from mlflow import MlflowClient

    from pipelines.eval.paper import find_run
    from serve.settings import tracking_uri

    result = evaluated["results"]["mm-a"]
    metrics = result["metrics"]
    assert result["n"] == 7 and result["task"] == "text+mask" and result["step"] == 1
    for name in ("fid", "kid", "lpips", "ssim", "ms_ssim", "mask_acc", "miou"):
        assert isinstance(metrics[name], float), (name, metrics[name])
    assert metrics["fid"] > 0 and 0 <= metrics["mask_acc"] <= 1 and -1 <= metrics["ssim"] <= 1
    no_judges = evaluated["root"] / "no-judges"
    assert metrics["clip_score"] == metrics["cmmd"] == f"skipped: no weights at {no_judges / 'clip'}"
    assert metrics["dino_structure"] == f"skipped: no weights at {no_judges / 'dino'}"
    assert "2 of the standard 5" in result["ms_ssim_method"]  # 32 px
    assert result["throughput"]["images_per_s"] > 0

    run = find_run(MlflowClient(tracking_uri()), "mm-a")
    assert run.data.metrics["eval/text_mask/fid"] == pytest.approx(metrics["fid"])
    assert run.data.tags["eval/text_mask/clip_score"].startswith("skipped: no weights at")


def test_compare_prints_both_runs_and_names_a_missing_one(evaluated, capsys):
    assert main(["eval", "--compare", "mm-a", "mm-b"]) == 0
    table = capsys.readouterr().out
    assert "mm-a" in table and "mm-b" in table and "eval/text_mask/fid" in table
    assert "eval/text_mask/cmmd" in table and "skipped" in table
    assert main(["eval", "--compare", "mm-a", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow run named or with id 'nope'" in err and err.count("\n") == 1


def test_scoring_batch_by_batch_gives_the_fid_of_the_whole_set():
    from modeling.judges import Judges, load_inception
    from modeling.metrics import BatchScores, MetricTally, score_batch

    judges = Judges(inception=load_inception())
    generator = torch.Generator().manual_seed(0)
    real = (torch.rand(4, 3, 32, 32, generator=generator) * 255).to(torch.uint8)
    generated = (torch.rand(4, 3, 32, 32, generator=generator) * 255).to(torch.uint8)
    at_once = MetricTally(judges.loaded(), {})
    at_once.add(score_batch(judges, generated, real))
    by_batch = MetricTally(judges.loaded(), {})
    for start in range(0, 4, 3):  # batches of 3 and 1, through the columns that travel between Ray actors
        scores = score_batch(judges, generated[start : start + 3], real[start : start + 3])
        by_batch.add(BatchScores.from_columns(scores.columns()))
    assert by_batch.compute()["fid"] == pytest.approx(at_once.compute()["fid"], rel=1e-6)
    assert by_batch.compute()["kid"] == pytest.approx(at_once.compute()["kid"], rel=1e-6)
