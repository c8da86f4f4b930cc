"""The trainer's view of an architecture: the ``Task`` interface and what both architectures share.

A ``Task`` turns shard rows into the model's batch (the training-batch contract of ``modeling``), builds
the model from the run config, computes the loss and samples for the sample grid. The trainer loop,
checkpoints and MLflow logging are shared; ``mmface_task.py`` and ``mogle_task.py`` hold the two
architectures and ``tasks.make_task`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modeling import storage
from modeling.storage import Where
from pipelines.data.prepare import NULL_FILE, NULL_KEYS, REPREPARE, decode_tensor
from pipelines.train.config import TrainConfig

# Shard columns each architecture reads (nothing else is read from Parquet).
COMMON_COLUMNS = ["id", "n_captions", "text_tokens", "has_mask", "image_latent", "text_seq", "text_mask", "text_pooled"]


def stack_latents(column, shape) -> torch.Tensor:
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
        "latent": stack_latents(rows["image_latent"], latent_shape),
        "text": torch.from_numpy(text),
        "text_mask": torch.from_numpy(text_mask),
        "pooled": torch.from_numpy(np.stack(pooled).astype(np.float32)),
    }


@dataclass
class NullText:
    """What dropped conditions become, precomputed by ``prepare``: the empty caption's embedding and the codec's
    latent of an all-black image (a dropped MoGLE local mask)."""

    text: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor
    blank_latent: torch.Tensor

    @classmethod
    def load(cls, data_dir: Where) -> NullText:
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = storage.location(data_dir) / NULL_FILE
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; {REPREPARE}") from None
        try:
            tensors = load(data)
        except (OSError, SafetensorError, ValueError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}); {REPREPARE}") from None
        if NULL_KEYS - {"blank_latent"} - set(tensors):
            raise ValueError(f"{path}: lacks {', '.join(sorted(NULL_KEYS - set(tensors)))}; {REPREPARE}")
        if "blank_latent" not in tensors:
            raise ValueError(
                f"{path}: written by an older faceforge (no blank_latent); re-run `faceforge data prepare` with the "
                "same --out: finished shards are kept, only this file is rewritten"
            )
        return cls(tensors["seq"].float(), tensors["mask"].bool(), tensors["pooled"].float(), tensors["blank_latent"])

    def as_batch(self, device, dtype) -> dict:
        return {
            "null_text": self.text.to(device, dtype),
            "null_text_mask": self.text_mask.to(device),
            "null_pooled": self.pooled.to(device, dtype),
            "null_cond_latent": self.blank_latent.to(device, dtype),
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

    def paper_sampler(self) -> tuple[int, float]:
        """(steps, guidance) of the architecture's paper sampler."""
        raise NotImplementedError

    def sampler_config(self) -> dict:
        """How this model samples when served: the run's ``model.sample_*`` or the paper's setting."""
        steps, guidance = self.paper_sampler()
        m = self.config.model
        sampler = {
            "steps": m.sample_steps or steps,
            "guidance": guidance if m.sample_guidance is None else m.sample_guidance,
        }
        if m.sample_text_guidance is not None:
            sampler["text_guidance"] = m.sample_text_guidance
        return sampler

    def condition_images(self, rows: dict) -> list[np.ndarray]:
        """What the sample grid shows as each sample's condition (the colour-coded mask)."""
        from modeling.conditions import labels_to_color

        size = self.manifest["size"]
        return [labels_to_color(decode_tensor(v, "uint8", (size, size))) for v in rows["mask_labels"]]
