"""The training-step benchmark runs on CPU for both architectures and prints its JSON contract."""

import json

import pytest

from bench import train_step

CONTRACT = {
    "model",
    "device",
    "batch",
    "depth",
    "samples_per_s",
    "mfu",
    "peak_gib",
    "peer",
    "peer_samples_per_s",
    "speedup_vs_peer",
}


@pytest.mark.parametrize("model", ["mmface-dit-tiny", "face-mogle-tiny"])
def test_train_step_prints_the_contract_last(model, capsys):
    result = train_step.main(["--model", model, "--device", "cpu", "--steps", "2", "--warmup", "1", "--no-sample"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert CONTRACT <= set(result)
    assert result["model"] == model and result["device"] == "cpu" and result["mfu"] is None
    assert result["samples_per_s"] > 0 and result["peer_samples_per_s"] > 0
    assert result["speedup_vs_peer"] == pytest.approx(result["samples_per_s"] / result["peer_samples_per_s"], rel=1e-2)
    assert result["optimizer"] == "modeling.optim.AdamW8bit"
    assert result["peer_optimizer"] == "bitsandbytes.optim.AdamW8bit"


def test_unknown_model_names_the_known_ones():
    with pytest.raises(SystemExit, match="mmface-dit-xl"):
        train_step.main(["--model", "no-such-model", "--device", "cpu"])
