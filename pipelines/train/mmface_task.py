"""MMFace-DiT behind the trainer's ``Task`` interface."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from pipelines.train.task import COMMON_COLUMNS, Task, collate_common, stack_latents


class MMFaceDiTTask(Task):
    arch = "mmface-dit"
    columns = COMMON_COLUMNS + ["mask_latent", "sketch_latent", "mask_labels"]

    @functools.cached_property
    def objective(self):
        from modeling.diffusion import ObjectiveConfig

        m = self.config.model
        dropout = {} if m.cond_dropout is None else {"cond_dropout": m.cond_dropout}
        kind = "flow" if m.objective == "rfm" else "ddpm"
        return ObjectiveConfig(kind=kind, min_snr_gamma=m.min_snr_gamma, **dropout)

    def collate(self, rows: dict, rng: np.random.Generator, fixed: bool = False) -> dict:
        batch = collate_common(rows, self.manifest, rng, caption=0 if fixed else None)
        shape = tuple(self.manifest["latent_shape"])
        batch["mask_latent"] = stack_latents(rows["mask_latent"], shape)
        batch["sketch_latent"] = stack_latents(rows["sketch_latent"], shape)
        has_mask = np.asarray(rows["has_mask"], bool)
        if fixed:  # sample grids alternate mask and sketch conditions
            modality = np.arange(len(has_mask)) % 2
        else:  # mask or sketch when both exist: 50/50 in the paper (SPEC §1), data.sketch_fraction here
            modality = (rng.random(len(has_mask)) < self.config.data.sketch_fraction).astype(np.int64)
        batch["modality"] = torch.from_numpy(np.where(has_mask, modality, 1).astype(np.int64))
        return batch

    @functools.cached_property
    def model_config(self):
        from modeling.mmface_dit import PRESETS, MMFaceDiTConfig

        m = self.config.model
        if m.preset not in PRESETS:
            raise ValueError(f"model.preset={m.preset!r}: MMFace-DiT presets are {', '.join(PRESETS)}")
        values = {**PRESETS[m.preset].to_dict(), **m.options}
        return MMFaceDiTConfig.from_dict(values)

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        from modeling.mmface_dit import build

        model = build(self.model_config, device=device)
        model.set_gradient_checkpointing(self.config.model.grad_checkpointing)
        return model

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from modeling.diffusion import training_loss

        return training_loss(model, batch, self.objective, generator)

    def sample(self, model: nn.Module, conditions: dict, seeds: list[int], steps: int) -> torch.Tensor:
        from modeling.diffusion import SamplerConfig, sample

        guidance = self.config.logging.guidance
        sampler = SamplerConfig(
            steps=steps, guidance_scale=self.sampler_config()["guidance"] if guidance is None else guidance
        )
        return sample(model, conditions, seeds, self.objective, sampler)

    def weights_config(self, model: nn.Module) -> dict:
        return {
            "arch": self.arch,
            "preset": self.config.model.preset,
            "model": self.model_config.to_dict(),
            "objective": self.config.model.objective,
            "min_snr_gamma": self.config.model.min_snr_gamma,
            "cond_dropout": self.objective.cond_dropout,
            "codec": self.manifest["codec"],
            "text_encoder": self.manifest["text_encoder"],
            "size": self.manifest["size"],
            "sampler": self.sampler_config(),
        }

    def paper_sampler(self) -> tuple[int, float]:
        from modeling.diffusion import SamplerConfig

        paper = SamplerConfig()
        return paper.steps, paper.guidance_scale
