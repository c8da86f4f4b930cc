"""The synthetic yardstick: its scoring on known images, its parser as a judge, and a shortened demo recipe that
trains MMFace-DiT through the real trainer and must score clearly above chance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from modeling.conditions import NUM_CLASSES
from pipelines.data.synth import render_face, sample_attributes
from pipelines.eval.yardstick import flat_metrics, score
from tests.conftest import SHORT_RECIPE


def _renders(n: int, size: int = 32, seed: int = 11):
    images, labels, attributes = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        attrs = sample_attributes(rng)
        image, label = render_face(attrs, rng, size)
        images.append(image)
        labels.append(label)
        attributes.append(dataclasses.asdict(attrs))
    return np.stack(images), np.stack(labels), attributes


def test_real_renders_score_perfectly_and_noise_scores_near_chance():
    images, labels, attributes = _renders(24)
    perfect = score(images, labels, labels, attributes)
    assert perfect["miou"] == 1.0 and perfect["mask_acc"] == 1.0
    # faces whose masks are not their own: the shuffled baseline is what ignoring the mask earns
    assert perfect["miou_shuffled"] < 0.7 and perfect["miou_chance"] == round(1 / NUM_CLASSES, 4)
    for name in ("hair_color", "background_color"):
        entry = perfect["attributes"][name]
        assert entry["n"] > 0 and entry["accuracy"] >= 0.95, (name, entry)  # the reader reads renders right
        assert entry["shuffled"] < entry["accuracy"]

    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    parsed = np.random.default_rng(1).integers(0, NUM_CLASSES, labels.shape)
    random = score(noise, labels, parsed, attributes)
    assert random["miou"] < 0.1
    hair = random["attributes"]["hair_color"]
    assert hair["accuracy"] < 0.5  # grey medians land on one palette entry, not the stated one

    metrics = flat_metrics(perfect)
    assert metrics["eval/miou"] == 1.0 and "eval/hair_color_acc" in metrics and "eval/hair_color_chance" in metrics


def test_a_parser_under_the_bar_is_refused_as_a_judge(tmp_path):
    from modeling.judges.synthetic_parser import load_parser
    from pipelines.eval.parser import train_parser

    info = train_parser(tmp_path / "weak", steps=3, n_train=64, n_test=32)
    assert not info["counts_as_judge"] and info["pixel_accuracy"] < 0.95
    with pytest.raises(ValueError, match="0.95"):
        load_parser(tmp_path / "weak")
    with pytest.raises(FileNotFoundError):
        load_parser(tmp_path / "missing")


# The demo's MMFace-DiT recipe, shortened (``short_recipe`` in tests/conftest.py): 400 faces, a quicker parser, 600
# of the demo's 900 steps (Face-MoGLE needs ~600 steps to leave chance on attributes; its learning is proven by the
# sampling proofs and the demo). With the demo's recipe (text without RoPE, condition dropout 0.3) 400 steps were
# too few: hair and background colour were still at chance in one run of two (0.27 / 0.28; shuffled 0.26), and a
# floor on one colour over ~30 judged faces fails by sampling alone (one run's hair went 0.43 -> 0.83 with
# background 0.81 -> 0.50). Measured at 600 steps on the 2-core machine, three runs (Ray Data's order varies): mask
# mIoU 0.39-0.45 (shuffled conditions 0.24-0.26, chance 0.05), the mean of hair and background colour accuracy
# 0.57-0.67 (chance 0.2); asserted with a margin under the lowest reached.
FLOORS = {"miou": 0.32, "colours": 0.45}


@pytest.mark.slow  # the short recipe: prepare 400 faces, train a parser and 600 steps of MMFace-DiT
def test_short_recipe_follows_masks_and_captions_far_above_chance(short_recipe):
    from mlflow import MlflowClient

    from pipelines.cli import main

    root = short_recipe["root"]
    assert short_recipe["parser"]["pixel_accuracy"] >= 0.95  # a judge
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", short_recipe["uri"])
        run = "mmface-dit-tiny"
        out = root / "eval" / f"{run}.json"
        n = str(SHORT_RECIPE["eval_n"])
        code = main(["eval", run, "--storage", str(root / "runs"), "--data", str(root / "prepared"),
                     "--parser", str(root / "parser"), "--n", n, "--out", str(out)])  # fmt: skip
        assert code == 0
        result = json.loads(out.read_text())
        hair, background = (result["attributes"][k] for k in ("hair_color", "background_color"))
        print(f"\n{run}: mIoU {result['miou']} (shuffled {result['miou_shuffled']}), hair {hair['accuracy']}, "
              f"background {background['accuracy']}")  # fmt: skip
        assert result["miou"] >= FLOORS["miou"] and result["miou"] > result["miou_shuffled"] + 0.1
        assert (hair["accuracy"] + background["accuracy"]) / 2 >= FLOORS["colours"] and background["n"] > 0
        assert out.with_suffix(".png").is_file()
        # the figures are in the training run, at the checkpoint's step
        client = MlflowClient(short_recipe["uri"])
        from pipelines.train.run import mlflow_run_of

        run_id = mlflow_run_of(root / "runs" / run, short_recipe["uri"])
        logged = client.get_run(run_id).data.metrics
        assert logged["eval/miou"] == result["miou"] and logged["eval/miou_chance"] == result["miou_chance"]
        assert "eval/hair_color_acc" in logged


@pytest.mark.slow  # the short recipe: prepare 400 faces, train a parser and 600 steps of MMFace-DiT
def test_eval_refuses_a_dataset_without_known_attributes_in_one_line(short_recipe, tmp_path, capsys):
    import shutil

    from pipelines.cli import main

    root = short_recipe["root"]
    copy = tmp_path / "prepared"
    shutil.copytree(root / "prepared", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["root"] = str(tmp_path / "a-real-dataset")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code = main(["eval", str(root / "runs" / "mmface-dit-tiny"), "--data", str(copy), "--parser", str(root / "parser")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("faceforge: error:") and "attributes.jsonl" in err
    assert len(err.splitlines()) == 1, err
