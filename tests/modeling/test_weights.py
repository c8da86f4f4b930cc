"""Weight I/O: safetensors + config round trip, EMA weights, low-to-high resolution transfer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling.ema import EMA
from modeling.mmface_dit import PRESETS, MMFaceDiTConfig, build
from modeling.weights import load_into, load_weights, save_weights
from tests.modeling.test_mmface_dit import forward, make_batch, train_briefly

TINY = PRESETS["mmface-dit-tiny"]


def _upsampled(batch: dict, factor: int) -> dict:
    """The same batch at a higher latent resolution (as if the images were 512^2 instead of 256^2)."""
    out = dict(batch)
    for key in ("latent", "mask_latent", "sketch_latent"):
        out[key] = torch.nn.functional.interpolate(batch[key], scale_factor=factor, mode="nearest")
    return out


def test_low_resolution_weights_load_strictly_into_the_high_resolution_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    low = train_briefly(build(TINY), steps=5)  # trained on 8x8 latents
    ema = EMA.from_module(low)
    save_weights(tmp_path, low.state_dict(), low.config.to_dict(), ema_state_dict=ema.shadow_state_dict())

    state, config = load_weights(tmp_path)
    high = build(MMFaceDiTConfig.from_dict(config)).eval()
    result = high.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []

    batch = _upsampled(make_batch(seed=1), factor=2)  # 16x16 latents: 4x the image tokens
    torch.testing.assert_close(forward(high, batch), forward(low, batch))
    assert forward(high, batch).shape == batch["latent"].shape


def test_round_trip_keeps_config_model_and_ema(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(TINY)
    ema = EMA.from_module(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_weights(tmp_path, model.state_dict(), model.config.to_dict(), ema_state_dict=ema.shadow_state_dict())
    assert json.loads((tmp_path / "config.json").read_text()) == TINY.to_dict()

    state, config = load_weights(tmp_path)
    ema_state, _ = load_weights(tmp_path, ema=True)
    assert MMFaceDiTConfig.from_dict(config) == TINY
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)
        assert torch.equal(ema_state[name], initial[name])

    restored = build(TINY)
    load_into(restored, ema_state)
    ema.copy_to(model)
    for a, b in zip(restored.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_weights_of_another_architecture_are_refused_with_names(tmp_path: Path) -> None:
    save_weights(tmp_path, build(TINY).state_dict(), TINY.to_dict())
    state, _ = load_weights(tmp_path)
    deeper = build(MMFaceDiTConfig(**{**TINY.to_dict(), "depth": TINY.depth + 1}))
    with pytest.raises(ValueError, match=r"missing \['blocks\.4\."):
        load_into(deeper, state)
    wider = build(MMFaceDiTConfig(**{**TINY.to_dict(), "hidden_size": 64}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_into(wider, state)


def test_missing_files_name_the_directory(tmp_path: Path) -> None:
    save_weights(tmp_path, build(TINY).state_dict(), TINY.to_dict())
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        load_weights(tmp_path, ema=True)
