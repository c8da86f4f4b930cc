"""The command line: help, model info, and every shipped config validating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


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
