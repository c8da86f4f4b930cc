"""Face-MoGLE behind the trainer's ``Task`` interface.

Two stages share this task: ``mode: full`` trains a whole (tiny) FLUX + MoGLE from scratch (the embedded
demo's base, ``configs/flux_base_tiny.yaml``); ``mode: lora`` freezes a base and trains the condition LoRA
+ MoGLE (the paper, ``configs/face_mogle_tiny.yaml`` / ``face_mogle_flux_dev.yaml``). ``model.base_from``
names the base: a faceforge checkpoint of a ``full`` run, or a local diffusers FLUX folder.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from pipelines.train.task import COMMON_COLUMNS, Task, collate_common, stack_latents


class FaceMoGLETask(Task):
    arch = "face-mogle"
    columns = COMMON_COLUMNS + ["cond_latents", "mask_labels"]

    @functools.cached_property
    def model_config(self):
        from modeling.face_mogle import PRESETS, FaceMoGLEConfig

        m = self.config.model
        if m.preset not in PRESETS:
            raise ValueError(f"model.preset={m.preset!r}: Face-MoGLE presets are {', '.join(PRESETS)}")
        values = {**PRESETS[m.preset].to_dict(), "mode": m.mode, **m.options}
        if m.grad_checkpointing:
            values["checkpointing"] = "full" if m.grad_checkpointing == 1 else "selective"
        return FaceMoGLEConfig.from_dict(values)

    def collate(self, rows: dict, rng: np.random.Generator, fixed: bool = False) -> dict:
        batch = collate_common(rows, self.manifest, rng, caption=0 if fixed else None)
        batch["cond_latents"] = stack_latents(rows["cond_latents"], (20, *self.manifest["latent_shape"]))
        return batch

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        from modeling.face_mogle import build_face_mogle

        return build_face_mogle(self.model_config, self.config.model.base_from, device)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from modeling.face_mogle import training_loss

        return training_loss(model, batch, self.model_config, generator)

    def sample(self, model: nn.Module, conditions: dict, seeds: list[int], steps: int) -> torch.Tensor:
        from modeling.face_mogle import sample

        guidance = self.config.logging.guidance
        guidance = self.sampler_config()["guidance"] if guidance is None else guidance
        if self.model_config.flux.guidance_embeds:
            return sample(model, conditions, seeds, steps=steps, guidance=guidance)
        return sample(model, conditions, seeds, steps=steps, cfg_scale=guidance)

    def weights_config(self, model: nn.Module) -> dict:
        return {
            "arch": self.arch,
            "preset": self.config.model.preset,
            "model": self.model_config.to_dict(),
            "base_from": self.config.model.base_from,
            "codec": self.manifest["codec"],
            "text_encoder": self.manifest["text_encoder"],
            "size": self.manifest["size"],
            "sampler": self.sampler_config(),
        }

    def paper_sampler(self) -> tuple[int, float]:
        cfg = self.model_config
        return cfg.sample_steps, cfg.sample_guidance if cfg.flux.guidance_embeds else cfg.cfg_scale
