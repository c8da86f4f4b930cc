"""Face-MoGLE behind the trainer's ``Task`` interface.

Two stages share this task: ``mode: full`` trains a whole (tiny) FLUX + MoGLE from scratch (the embedded
demo's base, ``configs/flux_base_tiny.yaml``); ``mode: lora`` freezes a base and trains the condition LoRA
+ MoGLE (the paper, ``configs/face_mogle_tiny.yaml`` / ``face_mogle_flux_dev.yaml``). ``model.base_from``
names the base: a faceforge checkpoint of a ``full`` run, or a local diffusers FLUX folder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.train.checkpoints import weights_dir
from pipelines.train.tasks import COMMON_COLUMNS, Task, _stack_latents, collate_common


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
        batch["cond_latents"] = _stack_latents(rows["cond_latents"], (20, *self.manifest["latent_shape"]))
        return batch

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        return build_face_mogle(self.model_config, self.config.model.base_from, device)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from modeling.face_mogle import training_loss

        return training_loss(model, batch, self.model_config, generator)

    def sample(self, model: nn.Module, conditions: dict, seeds: list[int], steps: int) -> torch.Tensor:
        from modeling.face_mogle import sample

        return sample(model, conditions, seeds, steps=steps, guidance=self.config.logging.guidance)

    def weights_config(self, model: nn.Module) -> dict:
        return {
            "arch": self.arch,
            "preset": self.config.model.preset,
            "model": self.model_config.to_dict(),
            "base_from": self.config.model.base_from,
            "codec": self.manifest["codec"],
            "text_encoder": self.manifest["text_encoder"],
            "size": self.manifest["size"],
        }


def build_face_mogle(cfg, base_from: str | None, device: torch.device | str = "cpu") -> nn.Module:
    """A Face-MoGLE model whose frozen base comes from ``base_from`` (lora mode) or is fresh (full mode)."""
    from diffusers import FluxTransformer2DModel

    from modeling.face_mogle import FaceMoGLE, load_flux_transformer

    if cfg.mode == "full" or not base_from:
        with torch.device(device):
            return FaceMoGLE(cfg)
    base = Path(base_from)
    weights = weights_dir(base)
    if (weights / "config.json").is_file() and json.loads((weights / "config.json").read_text()).get("arch"):
        # a faceforge checkpoint of a full-mode run: its EMA holds the whole transformer and a trained MoGLE
        from modeling.weights import load_weights

        state, _ = load_weights(weights, ema=(weights / "ema.safetensors").is_file())
        transformer = FluxTransformer2DModel(**cfg.flux.kwargs())
        transformer.load_state_dict(_strip(state, "transformer."), strict=True)
        model = FaceMoGLE(cfg, transformer)
        model.mogle.load_state_dict(_strip(state, "mogle."), strict=True)
    else:
        model = FaceMoGLE(cfg, load_flux_transformer(base, torch.float32))
    return model.to(device)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_trainable(model: nn.Module, state: dict) -> None:
    """Load a checkpoint's trainable weights (all weights in full mode; LoRA + MoGLE in lora mode)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
