"""MMFace-DiT training step vs diffusers ``SD3Transformer2DModel`` of the same size.

Both sides get the same work per step: a rectified-flow loss on ``[noisy ; condition]`` latents
(2c input channels, c output), ``text_tokens`` caption tokens, a pooled caption vector, then
backward, grad-clip 0.5 and an AdamW8bit step (ours: the trainer's ``modeling.optim.AdamW8bit``,
the peer: stock bitsandbytes; ``--optimizer bitsandbytes`` gives ours the stock one too); bf16
autocast on CUDA, fp32 on CPU.
The peer is configured like the paper model: hidden 1152 = 16 heads x 72, in 32 / out 16
channels, joint_attention_dim 1024, pooled 1024, patch 2 (for the XL preset; the tiny preset maps
the same way). Ours runs ``modeling.diffusion.training_loss`` itself, condition dropout included.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from bench.cases import Case, adamw8bit, autocast
from modeling.diffusion import ObjectiveConfig, SamplerConfig, sample, training_loss
from modeling.mmface_dit import PRESETS, MMFaceDiT, MMFaceDiTConfig

DEFAULT_BATCH = {"cuda": 32, "cpu": 2}  # the paper: 32 per GPU
MODELS = ("mmface-dit-xl", "mmface-dit-tiny")

# pixels per latent cell of the codec each preset is paired with: FLUX VAE x8, pixel-unshuffle x4
CODEC_FACTOR = {"mmface-dit-xl": 8, "mmface-dit-tiny": 4}
GRAD_CLIP = 0.5


def build(args: argparse.Namespace, device: torch.device) -> Case:
    preset = PRESETS[args.model]
    depth = args.depth or preset.depth
    config = dataclasses.replace(preset, depth=depth)
    size = args.size or 256
    latent = size // CODEC_FACTOR[args.model]
    batch = args.batch
    tokens = args.text_tokens or 77
    data = _synthetic_batch(config, batch, latent, tokens, device)

    optimizer = getattr(args, "optimizer", "faceforge")
    ours = _OurModel(config, data, device, compile_model=args.compile, optimizer=optimizer)
    peer = None if args.no_peer else _SD3Peer(config, data, latent, device, compile_model=args.compile)
    infer_batch = args.infer_batch or (64 if device.type == "cuda" else 2)
    return Case(
        name=args.model,
        batch=batch,
        depth=depth,
        step=ours.step,
        peer_name=None if peer is None else "diffusers.SD3Transformer2DModel",
        peer_step=None if peer is None else peer.step,
        sample=None if args.no_sample else lambda: ours.sample(infer_batch),
        extra={"size": size, "latent": latent, "text_tokens": tokens, "infer_batch": infer_batch, "infer_steps": 28},
    )


def _synthetic_batch(config: MMFaceDiTConfig, batch: int, latent: int, tokens: int, device: torch.device) -> dict:
    """A batch in the trainer's contract. No text mask: every token is real, as with CLIP's 77."""
    g = torch.Generator().manual_seed(0)
    c = config.latent_channels

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {
        "latent": randn(batch, c, latent, latent),
        "text": randn(batch, tokens, config.text_dim),
        "pooled": randn(batch, config.pooled_dim),
        "null_text": randn(tokens, config.text_dim),
        "null_pooled": randn(config.pooled_dim),
        "mask_latent": randn(batch, c, latent, latent),
        "sketch_latent": randn(batch, c, latent, latent),
        "modality": (torch.arange(batch) % 2).to(device),
    }


class _OurModel:
    def __init__(
        self, config: MMFaceDiTConfig, data: dict, device: torch.device, compile_model: bool, optimizer: str
    ) -> None:
        self.config, self.data, self.device, self.compile_model = config, data, device, compile_model
        self.optimizer_impl = optimizer
        self.objective = ObjectiveConfig(kind="flow")
        self.model: torch.nn.Module | None = None

    def _ensure_built(self) -> torch.nn.Module:
        if self.model is None:
            torch.manual_seed(0)
            with torch.device(self.device):
                net = MMFaceDiT(self.config)
            self.params = list(net.parameters())
            self.optimizer = adamw8bit(self.params, self.optimizer_impl)
            # a generator on the device: drawing t / noise / dropout needs no host round trip
            self.generator = torch.Generator(self.device).manual_seed(0)
            self.model = torch.compile(net) if self.compile_model else net
        return self.model

    def step(self) -> None:
        model = self._ensure_built()
        with autocast(self.device):
            loss = training_loss(model, self.data, self.objective, self.generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sample(self, batch: int) -> int:
        model = self._ensure_built()
        model.eval()
        per_sample = ("text", "pooled", "mask_latent", "sketch_latent", "modality")
        conditions = {k: _tile(v, batch) if k in per_sample else v for k, v in self.data.items() if k != "latent"}
        with autocast(self.device):
            latents = sample(model, conditions, list(range(batch)), self.objective, SamplerConfig(steps=28))
        model.train()
        return latents.shape[0]


def _tile(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``t`` repeated along the batch dimension."""
    reps = -(-n // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:n]


class _SD3Peer:
    def __init__(
        self, config: MMFaceDiTConfig, data: dict, latent: int, device: torch.device, compile_model: bool
    ) -> None:
        self.config, self.data, self.latent, self.device = config, data, latent, device
        self.compile_model = compile_model
        self.model: torch.nn.Module | None = None

    def _ensure_built(self) -> torch.nn.Module:
        if self.model is None:
            from diffusers import SD3Transformer2DModel

            cfg = self.config
            torch.manual_seed(0)
            with torch.device(self.device):
                net = SD3Transformer2DModel(
                    sample_size=self.latent,
                    patch_size=cfg.patch_size,
                    in_channels=2 * cfg.latent_channels,
                    out_channels=cfg.latent_channels,
                    num_layers=cfg.depth,
                    attention_head_dim=cfg.head_dim,
                    num_attention_heads=cfg.num_heads,
                    joint_attention_dim=cfg.text_dim,
                    caption_projection_dim=cfg.hidden_size,
                    pooled_projection_dim=cfg.pooled_dim,
                    pos_embed_max_size=self.latent // cfg.patch_size,
                )
            self.params = list(net.parameters())
            self.optimizer = adamw8bit(self.params, "bitsandbytes")
            self.generator = torch.Generator(self.device).manual_seed(0)
            self.model = torch.compile(net) if self.compile_model else net
        return self.model

    def step(self) -> None:
        model = self._ensure_built()
        data = self.data["latent"]
        b = data.shape[0]
        t = torch.rand(b, generator=self.generator, device=self.device)
        noise = torch.randn(data.shape, generator=self.generator, device=self.device)
        t4 = t[:, None, None, None]
        noisy = (1 - t4) * noise + t4 * data
        with autocast(self.device):
            pred = model(
                hidden_states=torch.cat([noisy, self.data["mask_latent"]], dim=1),
                encoder_hidden_states=self.data["text"],
                pooled_projections=self.data["pooled"],
                timestep=t * 1000,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), data - noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
