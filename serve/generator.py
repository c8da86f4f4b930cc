"""A trained checkpoint as a face generator: prompts + optional masks/sketches + seeds -> RGB images.

Used by the MLflow pyfunc model (``faceforge publish``) and by the Serve deployment. It loads the
serving weights of a checkpoint (``weights/``: config.json + EMA safetensors), the codec and the text
encoder the dataset was prepared with, and runs the architecture's sampler. No Ray here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.data.layouts import labels_to_color
from pipelines.data.transforms import decouple_mask, resize_image, resize_labels
from pipelines.train.checkpoints import weights_dir as serving_weights


@dataclass
class GenerationRequest:
    prompt: str = ""
    mask: np.ndarray | None = None  # (H, W) uint8 labels 0..18
    sketch: np.ndarray | None = None  # (H, W) uint8, dark lines on white
    seed: int = 0


class FaceGenerator:
    def __init__(self, weights_dir: str | Path, device: str | torch.device = "cpu") -> None:
        from modeling.codecs import load_codec
        from modeling.text_encoders import load_text_encoder
        from modeling.weights import EMA_FILE, load_weights

        weights_dir = serving_weights(weights_dir)
        self.device = torch.device(device)
        state, self.config = load_weights(weights_dir, ema=(weights_dir / EMA_FILE).is_file())
        self.arch = self.config["arch"]
        self.size = int(self.config["size"])
        codec, text = self.config["codec"], self.config["text_encoder"]
        self.codec = load_codec(codec, self.device)  # the entry itself: it may override the VAE's shift
        self.text = load_text_encoder(text.get("spec", text["name"]), self.device)
        self.model = self._build(state).to(self.device).eval()
        empty = self.text.encode([""])
        self.null = {"null_text": empty.seq[0], "null_text_mask": empty.mask[0], "null_pooled": empty.pooled[0]}

    def _build(self, state: dict) -> torch.nn.Module:
        if self.arch == "mmface-dit":
            from modeling.mmface_dit import MMFaceDiTConfig, build
            from modeling.weights import load_into

            model = build(MMFaceDiTConfig.from_dict(self.config["model"]))
            load_into(model, state)
            return model
        from modeling.face_mogle import FaceMoGLEConfig
        from pipelines.train.mogle_task import build_face_mogle, load_trainable

        model = build_face_mogle(FaceMoGLEConfig.from_dict(self.config["model"]), self.config.get("base_from"))
        load_trainable(model, state)
        return model

    def describe(self) -> dict:
        return {
            "arch": self.arch,
            "preset": self.config.get("preset"),
            "size": self.size,
            "codec": self.config["codec"]["name"],
            "text_encoder": self.config["text_encoder"]["name"],
        }

    def _encode(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return self.codec.encode(x.to(self.device))

    @torch.no_grad()
    def generate(
        self, requests: list[GenerationRequest], steps: int = 28, guidance: float | None = None
    ) -> list[np.ndarray]:
        """One (size, size, 3) uint8 image per request; the same request and seed give the same image."""
        if not requests:
            return []
        emb = self.text.encode([r.prompt for r in requests])
        conditions = {"text": emb.seq, "text_mask": emb.mask, "pooled": emb.pooled}
        conditions |= {k: v.to(self.device) for k, v in self.null.items()}
        labels = [
            resize_labels(r.mask, self.size) if r.mask is not None else np.zeros((self.size, self.size), np.uint8)
            for r in requests
        ]
        seeds = [r.seed for r in requests]
        if self.arch == "mmface-dit":
            from modeling.diffusion import ObjectiveConfig, SamplerConfig, sample

            blank = np.full((self.size, self.size, 3), 255, np.uint8)
            sketches = [
                np.repeat(resize_image(r.sketch, self.size)[..., None], 3, -1) if r.sketch is not None else blank
                for r in requests
            ]
            conditions["mask_latent"] = self._encode([labels_to_color(lab) for lab in labels])
            conditions["sketch_latent"] = self._encode(sketches)
            modality = [1 if r.sketch is not None and r.mask is None else 0 for r in requests]
            conditions["modality"] = torch.tensor(modality, device=self.device)
            no_condition = torch.tensor([r.mask is None and r.sketch is None for r in requests], device=self.device)
            # text-only requests: the spatial condition is dropped as in training (zeros)
            conditions["mask_latent"][no_condition] = 0
            objective = ObjectiveConfig(kind="flow" if self.config["objective"] == "rfm" else "ddpm")
            sampler = SamplerConfig(steps=steps, guidance_scale=7.5 if guidance is None else guidance)
            latents = sample(self.model, conditions, seeds, objective, sampler)
        else:
            from modeling.face_mogle import sample

            cond = []
            for lab in labels:  # an absent mask is all background: text-only generation
                colour, binary = decouple_mask(lab)
                images = [colour] + [np.repeat((b * 255).astype(np.uint8)[..., None], 3, -1) for b in binary]
                cond.append(self._encode(images))
            conditions["cond_latents"] = torch.stack(cond)
            latents = sample(self.model, conditions, seeds, steps=steps, guidance=guidance)
        pixels = ((self.codec.decode(latents.float()) + 1) * 127.5).round().clamp(0, 255).byte()
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


def read_weights_config(path: str | Path) -> dict:
    return json.loads((serving_weights(path) / "config.json").read_text())
