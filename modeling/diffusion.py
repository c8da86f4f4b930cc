"""MMFace-DiT objectives (DDPM epsilon, rectified flow) and samplers (DPM-Solver++, flow Euler).

Entry points for a generic trainer and for serving:

- ``training_loss(model, batch, cfg: ObjectiveConfig, generator) -> Tensor`` (scalar). ``batch`` holds
  the keys of the training-batch contract: latent, text, text_mask (optional: absent = every token is
  real, the CLIP convention), pooled, null_text, null_text_mask, null_pooled, mask_latent,
  sketch_latent, modality. Every random draw (timestep, noise, condition dropout) comes from
  ``generator`` so a step is reproducible.
- ``sample(model, conditions, seeds, objective, sampler) -> Tensor`` latents (B, C, h, w);
  ``conditions`` holds the same keys without "latent"; sample ``i`` starts from noise seeded by
  ``seeds[i]``, so an image depends on its seed only, not on what else is in the batch.

A dropped caption (5% in training, the unconditional branch of CFG) means: text tokens = the
encoder output of the empty caption (``null_text``), and the pooled caption embedding = the
model's learned null vector. ``null_pooled`` is accepted but not needed by this model.

Time conventions. DDPM: integer step ``t`` in [0, 1000), ``z_t = sqrt(a_t) x + sqrt(1 - a_t) eps``.
Flow: ``t`` in [0, 1], ``z_t = (1 - t) noise + t data``, velocity ``data - noise``; sampling integrates
from t = 0 (noise) to 1 (data), the reverse of FLUX. The network always sees 1000 * t for flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler

MODEL_TIME_SCALE = 1000.0


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: Literal["flow", "ddpm"] = "flow"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # SD-2.1 scaled-linear schedule
    beta_end: float = 0.012
    min_snr_gamma: float | None = 5.0  # DDPM loss weight min(SNR, gamma) / SNR; None = unweighted
    text_dropout: float = 0.05
    cond_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "ddpm"):
            raise ValueError(f"objective kind must be 'flow' or 'ddpm', got {self.kind!r}")
        for name in ("text_dropout", "cond_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 50
    guidance_scale: float = 7.5
    # "text": the unconditional branch drops the caption only (SPEC); "joint": it also zeroes the
    # spatial condition, guiding on both
    guidance: Literal["text", "joint"] = "text"


def alphas_cumprod(cfg: ObjectiveConfig, device: torch.device | None = None) -> Tensor:
    """Scaled-linear betas (linear in sqrt(beta)), cumulative product of 1 - beta, float32."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas**2, dim=0).to(device=device, dtype=torch.float32)


def min_snr_weight(alpha_bar: Tensor, gamma: float) -> Tensor:
    """Min-SNR loss weight for epsilon prediction: ``min(SNR, gamma) / SNR``, SNR = a / (1 - a).

    Low-noise steps (huge SNR) are easy and would otherwise dominate the gradient; this caps them.
    """
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device, normal: bool) -> Tensor:
    """Draw on the generator's device, then move: the same seed gives the same numbers everywhere."""
    gen_device = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(tuple(shape), generator=generator, device=gen_device).to(device, non_blocking=True)


def _pad_tokens(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    pad = length - tokens.shape[-2]
    if pad == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def text_with_dropout(
    text: Tensor,
    text_mask: Tensor | None,
    null_text: Tensor,
    null_text_mask: Tensor | None,
    drop: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Replace the tokens of samples with ``drop[i]`` by the empty caption's, padding to a common length.

    Returns (text, mask); mask is None when every token is real (lets SDPA use its unmasked kernels).
    """
    b, length, _ = text.shape
    null_text = null_text.to(text.dtype)
    if text_mask is None and null_text_mask is None and null_text.shape[0] == length:
        return torch.where(drop[:, None, None], null_text[None], text), None
    if text_mask is None:
        text_mask = torch.ones(b, length, dtype=torch.bool, device=text.device)
    if null_text_mask is None:
        null_text_mask = torch.ones(null_text.shape[0], dtype=torch.bool, device=text.device)
    common = max(length, null_text.shape[0])
    text, text_mask = _pad_tokens(text, text_mask, common)
    null_text, null_text_mask = _pad_tokens(null_text, null_text_mask, common)
    text = torch.where(drop[:, None, None], null_text[None], text)
    mask = torch.where(drop[:, None], null_text_mask[None], text_mask)
    return text, mask


def spatial_condition(batch: dict[str, Tensor]) -> Tensor:
    """Per sample the mask latent (modality 0) or the sketch latent (modality 1)."""
    modality = batch["modality"]
    if "sketch_latent" not in batch:
        return batch["mask_latent"]
    if "mask_latent" not in batch:
        return batch["sketch_latent"]
    return torch.where((modality == 1)[:, None, None, None], batch["sketch_latent"], batch["mask_latent"])


def training_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    cfg: ObjectiveConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scalar loss of one batch under the chosen objective, with condition dropout. No host syncs."""
    data = batch["latent"]
    b, device = data.shape[0], data.device
    drop_text = _rand((b,), generator, device, normal=False) < cfg.text_dropout
    drop_cond = _rand((b,), generator, device, normal=False) < cfg.cond_dropout
    noise = _rand(data.shape, generator, device, normal=True).to(data.dtype)
    text, text_mask = text_with_dropout(
        batch["text"], batch.get("text_mask"), batch["null_text"], batch.get("null_text_mask"), drop_text
    )
    cond = spatial_condition(batch)
    cond = torch.where(drop_cond[:, None, None, None], torch.zeros_like(cond), cond)

    if cfg.kind == "flow":
        t = _rand((b,), generator, device, normal=False)
        t4 = t.to(data.dtype)[:, None, None, None]
        noisy = (1 - t4) * noise + t4 * data
        target = data - noise
        model_time = t * MODEL_TIME_SCALE
        weight = None
    else:
        u = _rand((b,), generator, device, normal=False)
        steps = (u * cfg.num_train_timesteps).long().clamp_(max=cfg.num_train_timesteps - 1)
        a = alphas_cumprod(cfg, device)[steps]
        signal, sigma = (v.to(data.dtype)[:, None, None, None] for v in (a.sqrt(), (1 - a).sqrt()))
        noisy = signal * data + sigma * noise
        target = noise
        model_time = steps.float()
        weight = None if cfg.min_snr_gamma is None else min_snr_weight(a, cfg.min_snr_gamma)

    pred = model(
        x=noisy,
        cond=cond,
        timestep=model_time,
        text=text,
        pooled=batch["pooled"],
        modality=batch["modality"],
        text_mask=text_mask,
        drop_caption=drop_text,
    )
    per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def _seeded_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


class GuidedDenoiser:
    """The network's prediction under classifier-free guidance, cond + uncond in one batched forward."""

    def __init__(self, model: nn.Module, conditions: dict[str, Tensor], sampler: SamplerConfig) -> None:
        self.model = model
        cond = spatial_condition(conditions)
        b = cond.shape[0]
        # one scale for the batch, or one per sample (``conditions["guidance_scale"]``, shape (B,)): a batch may mix
        # requests that guide differently (text alone guides harder than text with a mask)
        per_sample = conditions.get("guidance_scale")
        self.scale = (
            sampler.guidance_scale
            if per_sample is None
            else per_sample.to(device=cond.device, dtype=torch.float32).view(b, *([1] * (cond.dim() - 1)))
        )
        keep = torch.zeros(b, dtype=torch.bool, device=cond.device)
        drop = torch.ones_like(keep)
        text, mask = text_with_dropout(
            conditions["text"],
            conditions.get("text_mask"),
            conditions["null_text"],
            conditions.get("null_text_mask"),
            keep,
        )
        null, null_mask = text_with_dropout(
            conditions["text"],
            conditions.get("text_mask"),
            conditions["null_text"],
            conditions.get("null_text_mask"),
            drop,
        )
        uncond_cond = torch.zeros_like(cond) if sampler.guidance == "joint" else cond
        self.kwargs = {
            "cond": torch.cat([cond, uncond_cond]),
            "text": torch.cat([text, null]),
            "pooled": conditions["pooled"].repeat(2, 1),
            "modality": conditions["modality"].repeat(2),
            "text_mask": None if mask is None else torch.cat([mask, null_mask]),
            "drop_caption": torch.cat([keep, drop]),
        }

    def __call__(self, z: Tensor, model_time: Tensor) -> Tensor:
        out = self.model(x=torch.cat([z, z]), timestep=model_time.repeat(2), **self.kwargs)
        cond, uncond = out.chunk(2)
        scale = self.scale.to(out.dtype) if isinstance(self.scale, Tensor) else self.scale
        return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(
    model: nn.Module,
    conditions: dict[str, Tensor],
    seeds: Sequence[int],
    objective: ObjectiveConfig,
    sampler: SamplerConfig | None = None,
) -> Tensor:
    """Generate latents (B, C, h, w) shaped like the condition latent, one seed per sample."""
    sampler = sampler or SamplerConfig()
    cond = spatial_condition(conditions)
    if len(seeds) != cond.shape[0]:
        raise ValueError(f"sample got {len(seeds)} seeds for a batch of {cond.shape[0]}")
    denoise = GuidedDenoiser(model, conditions, sampler)
    z = _seeded_noise(cond.shape[1:], seeds, cond.device, cond.dtype)
    b = z.shape[0]
    if objective.kind == "flow":
        times = torch.linspace(0.0, 1.0, sampler.steps + 1, device=z.device)
        for t, t_next in zip(times[:-1], times[1:]):
            v = denoise(z, (t * MODEL_TIME_SCALE).expand(b))
            z = z + (t_next - t).to(z.dtype) * v
        return z
    scheduler = dpm_solver(objective)
    scheduler.set_timesteps(sampler.steps, device=z.device)
    z = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = denoise(z, t.float().expand(b))
        z = scheduler.step(eps, t, z).prev_sample
    return z


def dpm_solver(objective: ObjectiveConfig) -> DPMSolverMultistepScheduler:
    """diffusers DPM-Solver++ (multistep, order 2) on the training schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=objective.num_train_timesteps,
        beta_start=objective.beta_start,
        beta_end=objective.beta_end,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
