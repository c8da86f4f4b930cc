"""The condition branch on diffusers' FLUX: adds nothing on the base path, LoRA only on condition tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft.tuners.lora import LoraLayer

from modeling.flux_branch import add_condition_lora, condition_forward, lora_parameters

B, SIDE, T, IN = 2, 4, 5, 16
N = SIDE * SIDE


def _flux(guidance_embeds: bool = False) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=IN,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def _inputs(guidance_embeds: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack([torch.zeros(N), torch.arange(N) // SIDE, torch.arange(N) % SIDE], dim=-1).float()
    return {
        "hidden_states": torch.randn(B, N, IN, generator=g),
        "encoder_hidden_states": torch.randn(B, T, 24, generator=g),
        "pooled_projections": torch.randn(B, 12, generator=g),
        "timestep": torch.tensor([0.3, 0.8]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(T, 3),
        "guidance": torch.full((B,), 3.5) if guidance_embeds else None,
    }


def _randomise_lora(transformer: FluxTransformer2DModel) -> None:
    # peft's gaussian init leaves B = 0 (a no-op LoRA); make it act so that a leak would show
    with torch.no_grad():
        for _, p in lora_parameters(transformer):
            p.normal_(0, 0.5)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_without_condition_tokens_output_equals_plain_diffusers_flux_lora_loaded_or_not(guidance_embeds):
    plain = _flux(guidance_embeds)
    ours = copy.deepcopy(plain)
    inputs = _inputs(guidance_embeds)
    with torch.no_grad():
        expected = plain(**inputs).sample
        torch.testing.assert_close(condition_forward(ours, **inputs), expected)
        add_condition_lora(ours)
        _randomise_lora(ours)
        torch.testing.assert_close(condition_forward(ours, **inputs), expected)
        # the same LoRA applied the peft way (every token) does change the plain forward
        assert not torch.allclose(ours(**inputs).sample, expected, atol=1e-3)


def test_lora_wraps_exactly_the_spec_targets():
    transformer = _flux()
    add_condition_lora(transformer)
    wrapped = {name for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    expected = {"x_embedder"}
    for i in range(2):
        expected |= {
            f"transformer_blocks.{i}.{s}"
            for s in ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")
        }
        expected |= {
            f"single_transformer_blocks.{i}.{s}"
            for s in ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")
        }
    assert wrapped == expected
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if ".lora_" not in n)


def test_condition_tokens_change_the_image_output_and_only_they_feed_lora_gradients():
    transformer = _flux()
    add_condition_lora(transformer)
    _randomise_lora(transformer)
    inputs = _inputs()
    cond = torch.randn(B, N, IN)

    plain_path = condition_forward(transformer, **inputs)
    assert not plain_path.requires_grad  # no LoRA weight sits on the image/text path at all

    out = condition_forward(transformer, **inputs, cond_tokens=cond)
    assert not torch.allclose(out, plain_path, atol=1e-3)
    out.square().mean().backward()
    # the last block's condition outputs are discarded, so only its condition keys/values can matter
    dead = tuple(f"single_transformer_blocks.1.{m}" for m in ("attn.to_q", "proj_mlp", "proj_out"))
    for name, p in lora_parameters(transformer):
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad != name.startswith(dead), name
    assert all(p.grad is None for n, p in transformer.named_parameters() if ".lora_" not in n)


def test_condition_tokens_take_the_image_tokens_rope_ids():
    transformer = _flux()
    inputs = _inputs()
    seen = []
    transformer.pos_embed.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        condition_forward(transformer, **inputs, cond_tokens=torch.randn(B, N, IN))
    (ids,) = seen
    assert ids.shape == (T + 2 * N, 3)
    torch.testing.assert_close(ids[T : T + N], inputs["img_ids"])
    torch.testing.assert_close(ids[T + N :], inputs["img_ids"])


def test_checkpointing_modes_give_the_same_output_and_gradients():
    transformer = _flux()
    add_condition_lora(transformer)
    _randomise_lora(transformer)
    inputs = _inputs()
    cond = torch.randn(B, N, IN)
    results = []
    for mode in ("none", "full", "selective"):
        transformer.zero_grad(set_to_none=True)
        out = condition_forward(transformer, **inputs, cond_tokens=cond, checkpointing=mode)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for _, p in lora_parameters(transformer)]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want)


def test_frozen_fused_projections_follow_the_model_across_dtype_casts():
    plain = _flux()
    ours = copy.deepcopy(plain)
    add_condition_lora(ours)
    inputs = _inputs()
    with torch.no_grad():
        condition_forward(ours, **inputs)  # fuses the frozen q/k/v weights into one buffer
        ours.double()
        plain.double()
        inputs64 = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
        torch.testing.assert_close(condition_forward(ours, **inputs64), plain(**inputs64).sample)


def test_condition_tokens_must_match_the_image_grid():
    with pytest.raises(ValueError, match="must match the image tokens"):
        condition_forward(_flux(), **_inputs(), cond_tokens=torch.randn(B, N - 1, IN))
