"""What the trainer needs to know about each architecture, behind one small interface.

A ``Task`` turns shard rows into the model's batch (the training-batch contract of ``modeling``), builds
the model from the run config, computes the loss and samples for the sample grid. The trainer loop,
checkpoints and MLflow logging are shared; only this file knows the two models apart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.data.prepare import decode_tensor
from pipelines.train.config import TrainConfig

# Shard columns each architecture reads (nothing else is read from Parquet).
COMMON_COLUMNS = ["id", "n_captions", "text_tokens", "has_mask", "image_latent", "text_seq", "text_mask", "text_pooled"]


def _stack_latents(column, shape) -> torch.Tensor:
    return torch.from_numpy(np.stack([decode_tensor(v, "float16", shape) for v in column]).astype(np.float32))


def collate_common(rows: dict, manifest: dict, rng: np.random.Generator, caption: int | None = None) -> dict:
    """Latents and the text of one caption per sample (random, or index ``caption`` for fixed grids)."""
    latent_shape = tuple(manifest["latent_shape"])
    seq_dim, pooled_dim = manifest["text_dims"]["seq"], manifest["text_dims"]["pooled"]
    n = len(rows["id"])
    seqs, masks, pooled = [], [], []
    for i in range(n):
        k, length = int(rows["n_captions"][i]), int(rows["text_tokens"][i])
        pick = min(caption, k - 1) if caption is not None else int(rng.integers(k))
        seqs.append(decode_tensor(rows["text_seq"][i], "float16", (k, length, seq_dim))[pick])
        masks.append(decode_tensor(rows["text_mask"][i], "uint8", (k, length))[pick])
        pooled.append(decode_tensor(rows["text_pooled"][i], "float16", (k, pooled_dim))[pick])
    width = max(s.shape[0] for s in seqs)
    text = np.zeros((n, width, seq_dim), np.float32)
    text_mask = np.zeros((n, width), bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        text[i, : s.shape[0]] = s
        text_mask[i, : m.shape[0]] = m.astype(bool)
    return {
        "latent": _stack_latents(rows["image_latent"], latent_shape),
        "text": torch.from_numpy(text),
        "text_mask": torch.from_numpy(text_mask),
        "pooled": torch.from_numpy(np.stack(pooled).astype(np.float32)),
    }


@dataclass
class NullText:
    """The empty caption's embedding, precomputed by ``prepare`` (what a dropped caption becomes)."""

    text: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def load(cls, data_dir: str | Path) -> NullText:
        from safetensors.torch import load_file

        path = Path(data_dir) / "null_text.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; re-run `faceforge data prepare` on this dataset")
        tensors = load_file(str(path))
        return cls(tensors["seq"].float(), tensors["mask"].bool(), tensors["pooled"].float())

    def as_batch(self, device, dtype) -> dict:
        return {
            "null_text": self.text.to(device, dtype),
            "null_text_mask": self.text_mask.to(device),
            "null_pooled": self.pooled.to(device, dtype),
        }


class Task:
    arch: str
    columns: list[str]

    def __init__(self, config: TrainConfig, manifest: dict) -> None:
        self.config = config
        self.manifest = manifest

    def collate(self, rows: dict, rng: np.random.Generator, fixed: bool = False) -> dict:
        raise NotImplementedError

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, model: nn.Module, conditions: dict, seeds: list[int], steps: int) -> torch.Tensor:
        raise NotImplementedError

    def weights_config(self, model: nn.Module) -> dict:
        """config.json beside the checkpoint's safetensors: enough to rebuild the model for serving."""
        raise NotImplementedError

    def condition_images(self, rows: dict) -> list[np.ndarray]:
        """What the sample grid shows as each sample's condition (the colour-coded mask)."""
        from pipelines.data.layouts import labels_to_color

        size = self.manifest["size"]
        return [labels_to_color(decode_tensor(v, "uint8", (size, size))) for v in rows["mask_labels"]]


class MMFaceDiTTask(Task):
    arch = "mmface-dit"
    columns = COMMON_COLUMNS + ["mask_latent", "sketch_latent", "mask_labels"]

    @functools.cached_property
    def objective(self):
        from modeling.diffusion import ObjectiveConfig

        m = self.config.model
        return ObjectiveConfig(
            kind="flow" if m.objective == "rfm" else "ddpm",
            min_snr_gamma=m.min_snr_gamma,
        )

    def collate(self, rows: dict, rng: np.random.Generator, fixed: bool = False) -> dict:
        batch = collate_common(rows, self.manifest, rng, caption=0 if fixed else None)
        shape = tuple(self.manifest["latent_shape"])
        batch["mask_latent"] = _stack_latents(rows["mask_latent"], shape)
        batch["sketch_latent"] = _stack_latents(rows["sketch_latent"], shape)
        has_mask = np.asarray(rows["has_mask"], bool)
        if fixed:  # sample grids alternate mask and sketch conditions
            modality = np.arange(len(has_mask)) % 2
        else:  # mask or sketch 50/50 when both exist (SPEC §1)
            modality = rng.integers(0, 2, size=len(has_mask))
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
        sampler = SamplerConfig(steps=steps, guidance_scale=7.5 if guidance is None else guidance)
        return sample(model, conditions, seeds, self.objective, sampler)

    def weights_config(self, model: nn.Module) -> dict:
        return {
            "arch": self.arch,
            "preset": self.config.model.preset,
            "model": self.model_config.to_dict(),
            "objective": self.config.model.objective,
            "min_snr_gamma": self.config.model.min_snr_gamma,
            "codec": self.manifest["codec"],
            "text_encoder": self.manifest["text_encoder"],
            "size": self.manifest["size"],
        }


def make_task(config: TrainConfig, manifest: dict) -> Task:
    if config.model.arch == "mmface-dit":
        task: Task = MMFaceDiTTask(config, manifest)
    else:
        from pipelines.train.mogle_task import FaceMoGLETask

        task = FaceMoGLETask(config, manifest)
    target = "mmface" if config.model.arch == "mmface-dit" else "mogle"
    if target not in manifest["targets"]:
        raise ValueError(
            f"{config.data.path}: prepared for targets {manifest['targets']}, but {config.model.arch} needs "
            f"'{target}'; re-run `faceforge data prepare ... --targets {target}`"
        )
    return task
