"""Face-MoGLE: presets, modes, the FLUX flow objective with condition dropout, the sampler and LoRA I/O."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from modeling.codecs import PixelUnshuffleCodec
from modeling.face_mogle import (
    PRESETS,
    FaceMoGLE,
    FaceMoGLEConfig,
    background_conditions,
    build_model,
    describe_preset,
    flux_sigmas,
    load_adapter,
    pack_latents,
    sample,
    save_adapter,
    training_loss,
    unpack_latents,
)
from modeling.flux_branch import lora_parameters

B, C, H, W, T = 2, 12, 4, 4, 3


def _config(mode: str = "full", **overrides) -> FaceMoGLEConfig:
    return dataclasses.replace(PRESETS["face-mogle-tiny"], mode=mode, **overrides)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latent": torch.randn(B, C, H, W, generator=g),
        "text": torch.randn(B, T, 384, generator=g),
        "text_mask": torch.ones(B, T, dtype=torch.bool),
        "pooled": torch.randn(B, 384, generator=g),
        "null_text": torch.randn(2, 384, generator=g),
        "null_text_mask": torch.ones(2, dtype=torch.bool),
        "null_pooled": torch.randn(384, generator=g),
        "null_cond_latent": -torch.ones(C, H, W),  # the pixel codec's latent of a black image
        "cond_latents": torch.randn(B, 20, C, H, W, generator=g),
    }


def _fit(model: FaceMoGLE, batch: dict, cfg: FaceMoGLEConfig, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        # the same noise, times and dropout draws every step: a fixed regression problem to overfit
        loss = training_loss(model, batch, cfg, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_flux_dev_preset_counts_on_the_meta_device():
    info = describe_preset("face-mogle-flux-dev")
    parts = info["components"]
    assert 11.8e9 < parts["base"] < 12.0e9  # FLUX.1-dev transformer
    assert parts["lora"] == pytest.approx(14.5e6, rel=0.01)
    assert parts["mogle"] == pytest.approx(0.10e6, rel=0.05)
    assert info["trainable"] == parts["lora"] + parts["mogle"]
    assert info["params"] == sum(parts.values())


def test_tiny_full_mode_trains_everything_without_lora():
    info = describe_preset("face-mogle-tiny")
    assert info["components"]["lora"] == 0
    assert info["trainable"] == info["params"]


def test_pack_and_unpack_are_inverse():
    latent = torch.randn(B, C, H, W)
    tokens = pack_latents(latent)
    assert tokens.shape == (B, H * W // 4, 4 * C)
    torch.testing.assert_close(unpack_latents(tokens, H, W), latent)


def test_lora_mode_trains_only_lora_and_mogle_and_leaves_the_base_unchanged():
    torch.manual_seed(0)
    model = FaceMoGLE(_config("lora"))
    with torch.no_grad():  # make LoRA act from the start so that every factor gets gradients
        for _, p in lora_parameters(model.transformer):
            p.normal_(0, 0.1)
    base = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if ".lora_" not in n}
    lora = {n: p.detach().clone() for n, p in lora_parameters(model.transformer)}
    _fit(model, _batch(), model.cfg, steps=2, lr=1e-2)
    # the last block's condition outputs are discarded, so only its condition keys/values can learn
    last = len(model.transformer.single_transformer_blocks) - 1
    dead = tuple(f"single_transformer_blocks.{last}.{m}" for m in ("attn.to_q", "proj_mlp", "proj_out"))
    for name, p in model.transformer.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, lora[name]) == name.startswith(dead), name
        else:
            assert not p.requires_grad and torch.equal(p, base[name]), name
    assert all(p.requires_grad for p in model.mogle.parameters())


def test_condition_dropout_blacks_out_local_masks_and_swaps_in_the_empty_caption():
    model = FaceMoGLE(_config())
    seen = {}
    model.mogle.register_forward_pre_hook(lambda _m, args: seen.update(cond=args[0], t=args[2]))
    model.register_forward_pre_hook(lambda _m, args: seen.update(text=args[2], pooled=args[3]))
    batch = _batch()
    with torch.no_grad():
        training_loss(model, batch, _config(text_dropout=0.0, local_mask_dropout=0.0))
        torch.testing.assert_close(
            seen["cond"], pack_latents(batch["cond_latents"].flatten(0, 1)).unflatten(0, (B, 20))
        )
        torch.testing.assert_close(seen["text"], batch["text"])
        assert ((seen["t"] > 0) & (seen["t"] < 1)).all()

        training_loss(model, batch, _config(text_dropout=1.0, local_mask_dropout=1.0))
    # a dropped class is an absent class (the black image's latent, as at inference), never zero tokens
    blank = pack_latents(batch["null_cond_latent"][None])
    torch.testing.assert_close(seen["cond"][:, 1:], blank[:, None].expand(B, 19, *blank.shape[1:]))
    torch.testing.assert_close(seen["cond"][:, 0], pack_latents(batch["cond_latents"][:, 0]))  # never dropped
    torch.testing.assert_close(seen["text"][:, :2], batch["null_text"].expand(B, 2, 384))
    assert (seen["text"][:, 2:] == 0).all()
    torch.testing.assert_close(seen["pooled"], batch["null_pooled"].expand(B, 384))


def test_training_loss_is_reproducible_from_the_generator():
    model = FaceMoGLE(_config())
    batch = _batch()
    with torch.no_grad():
        a = training_loss(model, batch, None, torch.Generator().manual_seed(3))
        b = training_loss(model, batch, None, torch.Generator().manual_seed(3))
        c = training_loss(model, batch, None, torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_tiny_full_mode_overfits_and_lora_mode_on_top_fits_a_new_condition():
    torch.manual_seed(0)
    cfg = _config("full", text_dropout=0.0, local_mask_dropout=0.0)
    full = FaceMoGLE(cfg)
    losses = _fit(full, _batch(0), cfg, steps=60, lr=2e-3)
    assert losses[-1] <= 0.1 * losses[0]

    lora_cfg = dataclasses.replace(cfg, mode="lora")
    tuned = FaceMoGLE(lora_cfg, transformer=full.transformer)
    tuned.mogle.load_state_dict(full.mogle.state_dict())
    new = _batch(1)  # new images under new masks: the frozen base alone has not seen them
    losses = _fit(tuned, new, lora_cfg, steps=30, lr=5e-3)
    assert losses[-1] <= 0.8 * losses[0]
    assert all(not p.requires_grad for n, p in full.transformer.named_parameters() if ".lora_" not in n)


def test_flux_sigmas_match_diffusers_dynamic_shift():
    cfg = PRESETS["face-mogle-flux-dev"]
    steps, tokens = 28, 1024
    ours = flux_sigmas(steps, tokens, cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(ours, scheduler.sigmas.float())
    assert flux_sigmas(steps, 4096, cfg)[steps // 2] > flux_sigmas(steps, 256, cfg)[steps // 2]


def test_sampler_reruns_mogle_every_step_and_depends_only_on_each_seed():
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    conditions = {k: v for k, v in _batch().items() if k != "latent"}
    times = []
    model.mogle.register_forward_pre_hook(lambda _m, args: times.append(args[2][0].item()))
    out = sample(model, conditions, seeds=[5, 6], steps=3)
    assert out.shape == (B, C, H, W)
    sigmas = flux_sigmas(3, H * W // 4, model.cfg)
    assert times == pytest.approx(sigmas[:-1].tolist())  # t in [0, 1], one MoGLE run per step
    first = {k: v[:1] for k, v in conditions.items() if not k.startswith("null")}
    first.update({k: v for k, v in conditions.items() if k.startswith("null")})
    torch.testing.assert_close(sample(model, first, seeds=[5], steps=3), out[:1])


def test_a_caption_samples_the_same_alone_or_padded_beside_a_longer_one():
    # training pads captions per batch and serving batches requests: padded text keys must change nothing
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    conditions = {k: v for k, v in _batch().items() if k != "latent"}
    short = 2  # caption 0 has 2 real tokens, caption 1 all T
    conditions["text_mask"] = torch.ones(B, T, dtype=torch.bool)
    conditions["text_mask"][0, short:] = False
    conditions["text"][0, short:] = 0.0  # what collate pads with
    batched = sample(model, conditions, seeds=[5, 6], steps=3)
    alone = {k: (v[:1] if k in ("text", "text_mask", "pooled", "cond_latents") else v) for k, v in conditions.items()}
    alone["text"], alone["text_mask"] = alone["text"][:, :short], alone["text_mask"][:, :short]
    torch.testing.assert_close(sample(model, alone, seeds=[5], steps=3), batched[:1], atol=1e-5, rtol=1e-4)


def test_background_conditions_render_an_all_background_mask():
    cond = background_conditions(PixelUnshuffleCodec().encode, batch=2, size=16)
    assert cond.shape == (2, 20, 48, 4, 4)
    assert (cond[:, 1] == 1).all()  # class 0 (background) covers everything
    assert (cond[:, 0] == -1).all() and (cond[:, 2:] == -1).all()  # black global map, empty classes


def test_adapter_roundtrip_and_plain_diffusers_flux_can_load_the_lora(tmp_path):
    torch.manual_seed(0)
    cfg = _config("lora")
    model = FaceMoGLE(cfg)
    with torch.no_grad():
        for _, p in [*lora_parameters(model.transformer), *model.mogle.named_parameters()]:
            p.normal_()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    fresh = FaceMoGLE(cfg, transformer=FluxTransformer2DModel(**cfg.flux.kwargs()))
    load_adapter(fresh, path)
    for (name, want), (_, got) in zip(lora_parameters(model.transformer), lora_parameters(fresh.transformer)):
        torch.testing.assert_close(got, want, msg=name)
    for name, want in model.mogle.state_dict().items():
        torch.testing.assert_close(fresh.mogle.state_dict()[name], want)

    plain = FluxTransformer2DModel(**cfg.flux.kwargs())
    plain.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer")
    (adapter,) = plain.peft_config  # diffusers names it itself ("default_0")
    loaded = dict(plain.named_parameters())
    for name, want in lora_parameters(model.transformer):
        torch.testing.assert_close(loaded[name.replace(".default.", f".{adapter}.")], want, msg=name)
    assert plain.peft_config[adapter].r == cfg.lora_rank


def test_adapter_file_holds_no_base_weights(tmp_path):
    from safetensors import safe_open

    model = FaceMoGLE(_config("lora"))
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert all(".lora_" in k or k.startswith("mogle.") for k in keys)
    lora_count = sum(1 for k in keys if ".lora_" in k)
    assert lora_count == 2 * len({k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k})


def test_load_adapter_rejects_a_different_architecture(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(FaceMoGLE(_config("lora")), path)
    other = FaceMoGLE(_config("lora", lora_rank=8))
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(other, path)


def test_lora_mode_runs_with_a_bf16_frozen_base_beside_fp32_trainables():
    model = FaceMoGLE(_config("lora"))
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    loss = training_loss(model, _batch(), None, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.mogle.parameters())
