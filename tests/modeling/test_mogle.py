"""MoGLE: 20 per-token experts mixed by a diffusion-aware gate, and every ablation of the paper."""

from __future__ import annotations

import pytest
import torch

from modeling.mogle import NUM_EXPERTS, ExpertBank, MoGLE, MoGLEConfig

B, L, D = 2, 6, 64


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(B, NUM_EXPERTS, L, D, generator=g)
    noisy = torch.randn(B, L, D, generator=g)
    t = torch.tensor([0.2, 0.9])
    return cond, noisy, t


def _mogle(**kwargs) -> MoGLE:
    torch.manual_seed(0)
    return MoGLE(MoGLEConfig(**kwargs))


def test_paper_dims_have_twenty_experts_and_about_a_tenth_of_a_million_parameters(inputs):
    model = _mogle()
    assert model.experts.w1.shape == (20, 64, 32) and model.experts.w2.shape == (20, 32, 64)
    params = sum(p.numel() for p in model.parameters())
    assert 0.09e6 <= params <= 0.11e6
    cond, noisy, t = inputs
    assert model(cond, noisy, t).shape == (B, L, D)


def test_expert_bank_runs_each_expert_on_its_own_image_only():
    torch.manual_seed(0)
    bank = ExpertBank(NUM_EXPERTS, D, 32)
    x = torch.randn(B, NUM_EXPERTS, L, D)
    out = bank(x)
    for e in (0, 7, 19):
        h = torch.relu(x[:, e] @ bank.w1[e] + bank.b1[e])
        torch.testing.assert_close(out[:, e], h @ bank.w2[e] + bank.b2[e])


def test_gate_weights_lie_in_unit_interval_and_sum_to_one_per_token(inputs):
    weights = _mogle().gate_weights(*inputs)
    assert weights.shape == (B, L, NUM_EXPERTS)
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, L))


def test_output_is_the_gate_weighted_sum_of_expert_outputs(inputs):
    model = _mogle()
    cond, noisy, t = inputs
    w = model.gate_weights(cond, noisy, t)
    expected = sum(w[..., e, None] * model.experts(cond)[:, e] for e in range(NUM_EXPERTS))
    torch.testing.assert_close(model(cond, noisy, t), expected)


def test_dynamic_gate_depends_on_noisy_latent_and_time(inputs):
    model = _mogle()
    cond, noisy, t = inputs
    base = model.gate_weights(cond, noisy, t)
    assert not torch.allclose(base, model.gate_weights(cond, noisy + 1.0, t))
    assert not torch.allclose(base, model.gate_weights(cond, noisy, 1 - t))


def test_static_gating_ignores_noisy_latent_and_time(inputs):
    model = _mogle(gating="static")
    cond, noisy, t = inputs
    out = model(cond, noisy, t)
    torch.testing.assert_close(model(cond, torch.randn_like(noisy), 1 - t), out)
    torch.testing.assert_close(model(cond), out)


def test_scalar_gating_gives_token_constant_weights(inputs):
    weights = _mogle(gating="scalar").gate_weights(*inputs)
    torch.testing.assert_close(weights, weights[:, :1].expand_as(weights))
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, L))


def test_no_gating_sums_the_expert_outputs(inputs):
    model = _mogle(gating="sum")
    cond, noisy, t = inputs
    torch.testing.assert_close(model(cond, noisy, t), model.experts(cond).sum(1))


def test_no_experts_mixes_the_raw_condition_tokens(inputs):
    model = _mogle(expert_mlp=False, gating="sum")
    cond, noisy, t = inputs
    assert model.experts is None
    torch.testing.assert_close(model(cond, noisy, t), cond.sum(1))


def test_only_global_uses_the_global_expert_alone(inputs):
    model = _mogle(experts="global")
    cond, noisy, t = inputs
    out = model(cond, noisy, t)
    torch.testing.assert_close(out, model.experts(cond)[:, 0])
    other = cond.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    torch.testing.assert_close(model(other, noisy, t), out)


def test_only_local_gives_the_global_expert_no_weight(inputs):
    weights = _mogle(experts="local").gate_weights(*inputs)
    assert (weights[..., 0] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, L))


def test_only_local_removes_the_global_mask_everywhere_the_gate_included(inputs):
    # the ablation of the paper: the global mask neither reaches an expert nor steers the gate
    model = _mogle(experts="local")
    cond, noisy, t = inputs
    other = cond.clone()
    other[:, 0] = torch.randn_like(other[:, 0])
    torch.testing.assert_close(model(other, noisy, t), model(cond, noisy, t))
    with pytest.raises(ValueError, match="static gate"):
        MoGLEConfig(experts="local", gating="static")


def test_dynamic_gate_refuses_to_run_without_latent_or_time(inputs):
    cond, _, _ = inputs
    with pytest.raises(ValueError, match="Z_t"):
        _mogle()(cond)


def test_unknown_ablation_names_are_rejected():
    with pytest.raises(ValueError, match="gating"):
        MoGLEConfig(gating="soft")
