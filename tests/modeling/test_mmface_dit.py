"""MMFace-DiT network: size, init, RoPE, conditioning paths, gradient checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modeling.diffusion import ObjectiveConfig, training_loss
from modeling.mmface_dit import PRESETS, MMFaceDiT, MMFaceDiTConfig, build, describe_preset
from modeling.rope import apply_rope, axial_positions, rope_angles, rope_cos_sin, sequence_positions

TINY = PRESETS["mmface-dit-tiny"]
LATENT = 8  # 8x8 latent: 16 image tokens at patch 2, enough for every property tested here


def make_batch(cfg: MMFaceDiTConfig = TINY, batch: int = 4, tokens: int = 6, seed: int = 0) -> dict:
    """A training batch in the trainer's contract, with one padded caption and both modalities."""
    g = torch.Generator().manual_seed(seed)
    c, size = cfg.latent_channels, LATENT
    text_mask = torch.ones(batch, tokens, dtype=torch.bool)
    text_mask[0, tokens - 2 :] = False
    return {
        "latent": torch.randn(batch, c, size, size, generator=g),
        "text": torch.randn(batch, tokens, cfg.text_dim, generator=g),
        "text_mask": text_mask,
        "pooled": torch.randn(batch, cfg.pooled_dim, generator=g),
        "null_text": torch.randn(2, cfg.text_dim, generator=g),
        "null_text_mask": torch.ones(2, dtype=torch.bool),
        "null_pooled": torch.randn(cfg.pooled_dim, generator=g),
        "mask_latent": torch.randn(batch, c, size, size, generator=g),
        "sketch_latent": torch.randn(batch, c, size, size, generator=g),
        "modality": torch.arange(batch) % 2,
    }


def train_briefly(model: MMFaceDiT, steps: int = 25, seed: int = 0) -> MMFaceDiT:
    """A few real optimizer steps so that the zero-initialised paths carry signal."""
    batch = make_batch(model.config, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    cfg = ObjectiveConfig(kind="flow")
    for _ in range(steps):
        opt.zero_grad()
        training_loss(model, batch, cfg, gen).backward()
        opt.step()
    return model.eval()


def forward(model: MMFaceDiT, batch: dict, **overrides) -> torch.Tensor:
    b = batch["latent"].shape[0]
    kwargs = {
        "x": batch["latent"],
        "cond": batch["mask_latent"],
        "timestep": torch.linspace(100.0, 900.0, b),
        "text": batch["text"],
        "pooled": batch["pooled"],
        "modality": batch["modality"],
        "text_mask": batch["text_mask"],
    }
    kwargs.update(overrides)
    with torch.no_grad():
        return model(**kwargs)


@pytest.fixture(scope="module")
def trained() -> MMFaceDiT:
    torch.manual_seed(0)
    return train_briefly(build(TINY))


def test_xl_preset_has_the_papers_parameter_count_on_meta() -> None:
    info = describe_preset("mmface-dit-xl")
    assert info["params"] == pytest.approx(1.345e9, rel=0.01)
    assert info["trainable"] == info["params"] == sum(info["components"].values())
    assert set(info["components"]) == {"embedders", "blocks", "final_layer"}
    assert info["components"]["blocks"] / 28 == pytest.approx(47.8e6, rel=0.01)


def test_tiny_preset_fits_the_embedded_codec_and_text_encoder() -> None:
    assert (TINY.latent_channels, TINY.text_dim, TINY.pooled_dim) == (12, 384, 384)
    assert describe_preset("mmface-dit-tiny")["params"] < 5e6


def test_output_is_exactly_zero_at_init_with_the_latent_shape() -> None:
    torch.manual_seed(0)
    model = build(TINY)
    batch = make_batch()
    out = forward(model, batch)
    assert out.shape == batch["latent"].shape
    assert torch.count_nonzero(out) == 0


def test_image_rope_logits_are_invariant_to_a_shift_of_all_positions() -> None:
    torch.manual_seed(0)
    head_dim, n = 32, 12
    q, k = torch.randn(2, n, head_dim, dtype=torch.float64), torch.randn(2, n, head_dim, dtype=torch.float64)
    positions = axial_positions(3, 4)

    def logits(pos: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(rope_angles(pos, (head_dim // 2, head_dim // 2)), torch.float64)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    base = logits(positions)
    # angles are float32 (as in the model), hence the tolerance
    torch.testing.assert_close(logits(positions + torch.tensor([5.0, -3.0])), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(positions * 2), base)  # a rescale is not a shift: logits move


def test_text_rope_logits_are_invariant_to_a_shift_of_all_positions() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(7, 32, dtype=torch.float64), torch.randn(7, 32, dtype=torch.float64)

    def logits(offset: float) -> torch.Tensor:
        cos, sin = rope_cos_sin(rope_angles(sequence_positions(7) + offset, (32,)), torch.float64)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T

    torch.testing.assert_close(logits(11.0), logits(0.0), atol=1e-5, rtol=1e-5)


def _permute_text(batch: dict) -> dict:
    # sample 1 has no padding; reversing its tokens is a pure reordering of the same set
    order = torch.arange(batch["text"].shape[1]).flip(0)
    permuted = dict(batch)
    permuted["text"] = batch["text"][:, order]
    permuted["text_mask"] = batch["text_mask"][:, order]
    return permuted


def test_text_rope_makes_text_order_matter_only_when_enabled(trained: MMFaceDiT) -> None:
    batch = make_batch(seed=1)
    assert TINY.text_rope
    on = forward(trained, batch)
    assert on.abs().max() > 1e-3
    assert not torch.allclose(forward(trained, _permute_text(batch)), on, atol=1e-5)

    off_model = MMFaceDiT(dataclasses.replace(TINY, text_rope=False)).eval()
    off_model.load_state_dict(trained.state_dict())
    off = forward(off_model, batch)
    assert not torch.allclose(off, on, atol=1e-5)  # same weights, the option alone changes the output
    # no text positions: attention sees the text tokens as a set
    torch.testing.assert_close(forward(off_model, _permute_text(batch)), off, atol=1e-5, rtol=1e-5)


def test_modality_flag_changes_the_output(trained: MMFaceDiT) -> None:
    batch = make_batch(seed=2)
    as_mask = forward(trained, batch, modality=torch.zeros(4, dtype=torch.long))
    as_sketch = forward(trained, batch, modality=torch.ones(4, dtype=torch.long))
    assert (as_mask - as_sketch).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_dropped_caption_uses_the_learned_null_vector(trained: MMFaceDiT) -> None:
    batch = make_batch(seed=3)
    drop = torch.tensor([True, True, False, False])
    out = forward(trained, batch, drop_caption=drop)
    other_pooled = forward(trained, batch, drop_caption=drop, pooled=torch.randn_like(batch["pooled"]))
    torch.testing.assert_close(other_pooled[:2], out[:2])  # dropped: the caption vector is not read
    assert not torch.allclose(other_pooled[2:], out[2:])  # kept: it is

    null = trained.caption_embedder.null
    with torch.no_grad():
        saved = null.clone()
        null.add_(1.0)
        moved = forward(trained, batch, drop_caption=drop)
        null.copy_(saved)
    assert not torch.allclose(moved[:2], out[:2])
    torch.testing.assert_close(moved[2:], out[2:])


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(every: int) -> None:
    torch.manual_seed(0)
    model = train_briefly(build(TINY), steps=3).train()
    batch = make_batch(seed=4)
    cfg = ObjectiveConfig(kind="ddpm")

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = training_loss(model, batch, cfg, torch.Generator().manual_seed(7))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.set_gradient_checkpointing(0)
    loss_plain, grads_plain = loss_and_grads()
    model.set_gradient_checkpointing(every)
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert len(grads_ckpt) == len(grads_plain)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpoint_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        build(TINY).set_gradient_checkpointing(-1)


def test_last_block_shortcut_gives_the_full_blocks_image_output(trained: MMFaceDiT) -> None:
    """The last block skips text queries and the text MLP; its image tokens must not notice."""
    batch = make_batch(seed=5)
    block = trained.blocks[-1]
    g = torch.Generator().manual_seed(5)
    b, n_img, n_txt, h = 4, 16, 6, trained.config.hidden_size
    img, txt = torch.randn(b, n_img, h, generator=g), torch.randn(b, n_txt, h, generator=g)
    c = torch.randn(b, h, generator=g)
    cos, sin = trained.rope_tables(4, 4, n_txt, img.device, img.dtype)
    mask = torch.cat([torch.ones(b, n_img, dtype=torch.bool), batch["text_mask"]], dim=1)[:, None, None, :]
    with torch.no_grad():
        full_img, _ = block(img, txt, c, cos, sin, mask, last=False)
        short_img, short_txt = block(img, txt, c, cos, sin, mask, last=True)
    torch.testing.assert_close(short_img, full_img, atol=1e-6, rtol=1e-5)
    assert short_txt is txt  # the last block's text output is never computed
