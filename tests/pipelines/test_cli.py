"""The command line: help, model info, and every shipped config validating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.train.config import load_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "model", "train", "publish", "demo"):
        assert command in out


@pytest.mark.parametrize("preset", ["mmface-dit-xl", "face-mogle-flux-dev", "mmface-dit-tiny", "face-mogle-tiny"])
def test_model_info_prints_counts_for_every_preset(preset, capsys):
    assert main(["model", "info", preset]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == preset and info["params"] >= info["trainable"] > 0
    assert sum(info["components"].values()) in (info["params"], info["params"] - info["components"].get("base", 0))


def test_model_info_unknown_preset_is_a_clear_error(capsys):
    assert main(["model", "info", "mmface-dit-huge"]) == 2
    assert "known presets" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.model.preset and config.train.max_steps > 0


def test_spatial_condition_dropout_is_a_config_knob_with_the_papers_default():
    from pipelines.train.tasks import make_task

    manifest = {"latent_shape": [12, 16, 16], "targets": ["mmface", "mogle"]}
    paper = make_task(load_config(None), manifest).objective
    demo = make_task(load_config(CONFIGS_DIR / "mmface_dit_tiny.yaml"), manifest).objective
    assert paper.cond_dropout == 0.05 and demo.cond_dropout == 0.3  # SPEC §1; the demo: text alone draws a face
    assert make_task(load_config(None, ["model.cond_dropout=0.5"]), manifest).objective.cond_dropout == 0.5
    with pytest.raises(ValueError, match="model.cond_dropout=1.5: a probability"):
        load_config(None, ["model.cond_dropout=1.5"])
    with pytest.raises(ValueError, match="only MMFace-DiT"):
        load_config(CONFIGS_DIR / "face_mogle_tiny.yaml", ["model.cond_dropout=0.2"])
