"""Face-MoGLE training-step benchmark: our condition branch against the FLUX + LoRA a user would write.

Both sides train in "lora" mode on the same config (random weights, real architecture, ``--depth d`` keeps
d double + 2d single blocks): MoGLE fuses 20 mask latents into condition tokens, one FLUX rectified-flow
loss, AdamW 8-bit on LoRA + MoGLE.

- ours: ``modeling.face_mogle.training_loss``: condition tokens as a third stream (AdaLN at t = 0, LoRA on
  condition rows only, fused projections), checkpointing as the preset says;
- peer: the plain diffusers ``FluxTransformer2DModel`` with peft LoRA r=4 on the same targets (so LoRA acts
  on every token), condition tokens concatenated to the image tokens with duplicated position ids, diffusers'
  gradient checkpointing on.

``--size`` is the image side in pixels (latent side = size / 8 for FLUX.1-dev's VAE, size / 4 for the tiny
preset's pixel codec); ``--text-tokens`` the caption length (T5: 512, MiniLM: 77).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from bench.cases import Case, adamw8bit, autocast
from modeling.face_mogle import (
    PRESETS,
    FaceMoGLE,
    FaceMoGLEConfig,
    image_ids,
    pack_conditions,
    pack_latents,
    sample,
    training_loss,
)
from modeling.flux_branch import add_condition_lora
from modeling.mogle import NUM_EXPERTS, MoGLE

DEFAULT_BATCH = {"cuda": 1, "cpu": 1}  # the paper: batch 8 on 8 GPUs
MODELS = ("face-mogle-flux-dev", "face-mogle-tiny")

_DEFAULTS = {  # model: (image side, caption tokens, codec downsampling)
    "face-mogle-flux-dev": (512, 512, 8),
    "face-mogle-tiny": (64, 77, 4),
}


def _config(args: argparse.Namespace) -> FaceMoGLEConfig:
    cfg = dataclasses.replace(PRESETS[args.model], mode="lora")
    if args.depth:
        cfg = dataclasses.replace(
            cfg, flux=dataclasses.replace(cfg.flux, num_layers=args.depth, num_single_layers=2 * args.depth)
        )
    return cfg


def _batch(cfg: FaceMoGLEConfig, batch: int, side: int, text_tokens: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    c = cfg.latent_channels

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {
        "latent": randn(batch, c, side, side),
        "text": randn(batch, text_tokens, cfg.flux.joint_attention_dim),
        "pooled": randn(batch, cfg.flux.pooled_projection_dim),
        "null_text": randn(text_tokens, cfg.flux.joint_attention_dim),
        "null_pooled": randn(cfg.flux.pooled_projection_dim),
        "cond_latents": randn(batch, NUM_EXPERTS, c, side, side),
        "null_cond_latent": randn(c, side, side),  # stands in for the codec's latent of a black image
    }


def _frozen_base_dtype(model: torch.nn.Module, device: torch.device) -> None:
    # frozen weights in bf16 on CUDA (24 GB instead of 48 for FLUX.1-dev); trainable ones stay fp32 masters
    if device.type == "cuda":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)


def _build_ours(cfg: FaceMoGLEConfig, device: torch.device) -> FaceMoGLE:
    model = FaceMoGLE(cfg).to(device)
    _frozen_base_dtype(model, device)
    return model


def _lazy(make):
    """A step function that builds its state on the first (untimed warm-up) call."""
    state = {}

    def run() -> None:
        if "fn" not in state:
            state["fn"] = make()
        return state["fn"]()

    return run


def build(args: argparse.Namespace, device: torch.device) -> Case:
    cfg = _config(args)
    default_side, default_tokens, down = _DEFAULTS[args.model]
    side = (getattr(args, "size", None) or default_side) // down
    text_tokens = getattr(args, "text_tokens", None) or default_tokens
    batch_size = args.batch

    def make_ours():
        model = _build_ours(cfg, device)
        opt = adamw8bit([p for p in model.parameters() if p.requires_grad], getattr(args, "optimizer", "faceforge"))
        batch = _batch(cfg, batch_size, side, text_tokens, device)
        gen = torch.Generator(device=device).manual_seed(0)
        loss_fn = torch.compile(training_loss) if getattr(args, "compile", False) else training_loss

        def step() -> None:
            with autocast(device):
                loss = loss_fn(model, batch, cfg, gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def make_peer():
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel(**cfg.flux.kwargs()).to(device)
        transformer.requires_grad_(False)
        add_condition_lora(transformer, cfg.lora_rank, cfg.lora_alpha)
        transformer.enable_gradient_checkpointing()
        _frozen_base_dtype(transformer, device)
        forward = torch.compile(transformer) if getattr(args, "compile", False) else transformer
        mogle = MoGLE(cfg.mogle).to(device)
        trainable = [p for p in [*transformer.parameters(), *mogle.parameters()] if p.requires_grad]
        opt = adamw8bit(trainable, "bitsandbytes")
        batch = _batch(cfg, batch_size, side, text_tokens, device)
        ids = image_ids(side, side, device)
        txt_ids = torch.zeros(text_tokens, 3, device=device)
        gen = torch.Generator(device=device).manual_seed(0)

        def step() -> None:
            with autocast(device):
                x0 = pack_latents(batch["latent"])
                b, n = x0.shape[:2]
                noise = torch.randn(x0.shape, generator=gen, device=device)
                t = torch.sigmoid(torch.randn(b, generator=gen, device=device))
                noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
                cond = mogle(pack_conditions(batch["cond_latents"]), noisy, t)
                guidance = torch.ones(b, device=device) if cfg.flux.guidance_embeds else None
                out = forward(
                    hidden_states=torch.cat([noisy, cond], dim=1),
                    encoder_hidden_states=batch["text"],
                    pooled_projections=batch["pooled"],
                    timestep=t,
                    img_ids=torch.cat([ids, ids]),
                    txt_ids=txt_ids,
                    guidance=guidance,
                ).sample[:, :n]
                loss = F.mse_loss(out.float(), noise - x0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    infer_batch = getattr(args, "infer_batch", None) or batch_size

    def make_sampler():
        model = _build_ours(cfg, device).eval()
        batch = _batch(cfg, infer_batch, side, text_tokens, device)
        conditions = {k: v for k, v in batch.items() if k != "latent"}

        def run() -> int:
            with autocast(device):
                sample(model, conditions, seeds=list(range(infer_batch)))
            return infer_batch

        return run

    return Case(
        name=args.model,
        batch=batch_size,
        depth=cfg.flux.num_layers,
        step=_lazy(make_ours),
        peer_name=None if getattr(args, "no_peer", False) else "diffusers-flux+peft-lora(concat,grad-ckpt)",
        peer_step=None if getattr(args, "no_peer", False) else _lazy(make_peer),
        sample=None if getattr(args, "no_sample", False) else _lazy(make_sampler),
        extra={
            "image_tokens": side * side // 4,
            "condition_tokens": side * side // 4,
            "text_tokens": text_tokens,
            "single_depth": cfg.flux.num_single_layers,
            "checkpointing": cfg.checkpointing,
            "sample_steps": cfg.sample_steps,
        },
    )
