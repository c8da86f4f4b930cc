"""EMA: the fp32 shadow follows the weights with the warm-up decay and round-trips through state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling.ema import EMA, tracked_names


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    return model


def test_tracks_only_trainable_parameters_in_fp32() -> None:
    model = _model().to(torch.bfloat16)
    ema = EMA.from_module(model)
    assert ema.names == ["0.weight", "1.weight", "1.bias"] == list(tracked_names(model))
    assert all(s.dtype == torch.float32 for s in ema.shadow)


def test_update_matches_the_closed_form_with_warmup() -> None:
    model = _model()
    ema = EMA.from_module(model, decay=0.9)
    start = [s.clone() for s in ema.shadow]
    params = ema.tracked(model)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update(params)  # n = 0: decay min(0.9, 1/10) = 0.1
    ema.update(params)  # n = 1: decay min(0.9, 2/11)
    d0, d1 = 0.1, 2 / 11
    for s, s0, p in zip(ema.shadow, start, params):
        after_first = d0 * s0 + (1 - d0) * p
        torch.testing.assert_close(s, d1 * after_first + (1 - d1) * p)
    assert ema.current_decay() == pytest.approx(min(0.9, 3 / 12))


def test_without_warmup_uses_the_fixed_decay() -> None:
    model = _model()
    ema = EMA.from_module(model, decay=0.99, warmup=False)
    start = [s.clone() for s in ema.shadow]
    params = ema.tracked(model)
    with torch.no_grad():
        for p in params:
            p.mul_(3.0)
    ema.update(params)
    for s, s0, p in zip(ema.shadow, start, params):
        torch.testing.assert_close(s, 0.99 * s0 + 0.01 * p)


def test_copy_to_and_state_dict_round_trip() -> None:
    model = _model()
    ema = EMA.from_module(model, decay=0.5)
    params = ema.tracked(model)
    with torch.no_grad():
        for p in params:
            p.add_(2.0)
    ema.update(params)
    state = ema.state_dict()

    other = _model()
    restored = EMA.from_module(other)
    restored.load_state_dict(state)
    assert restored.num_updates == 1 and restored.decay == 0.5
    restored.copy_to(other)
    for name, tensor in ema.shadow_state_dict().items():
        torch.testing.assert_close(dict(other.named_parameters())[name], tensor)


def test_explicit_tensor_lists_must_match_in_length() -> None:
    model = _model()
    ema = EMA.from_module(model)
    with pytest.raises(ValueError):
        ema.update(ema.tracked(model)[:1])
