"""A trained model as a face generator: prompts + optional masks/sketches + seeds -> RGB images.

``FaceGenerator(weights_dir)`` reads a serving weights folder (``config.json`` + safetensors, what the trainer
writes into every checkpoint and ``faceforge import`` writes from released weights), loads the codec and the
text encoder the data was prepared with, builds the model and runs its sampler. The MLflow pyfunc model, the
Serve deployment, the demo and the evaluation all generate through it, so they produce the same pixels.

Guarantees the Serve app relies on: image ``i`` depends on request ``i`` only (its own noise seed, its text
padding masked), so a request gives the same image alone or inside a batch; the same request twice gives the
same bytes.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from modeling.checkpoints import resolve_checkpoint
from modeling.checkpoints import weights_dir as find_weights_dir
from modeling.conditions import grey_to_rgb, labels_to_color, mogle_condition_images, resize_image, resize_labels
from modeling.weights import CONFIG_FILE, EMA_FILE, load_weights

WeightsChoice = Literal["auto", "ema", "raw"]


@dataclass
class GenerationRequest:
    prompt: str = ""
    mask: np.ndarray | None = None  # (H, W) uint8 labels 0..18
    sketch: np.ndarray | None = None  # (H, W) uint8, dark lines on white
    seed: int = 0


@dataclass(frozen=True)
class SamplerDefaults:
    """What a request gets when it names no ``steps`` / ``guidance``: the model's own sampler config."""

    steps: int
    guidance: float
    # what a request with no mask and no sketch gets (MMFace-DiT): text alone needs stronger guidance to state its
    # colours; None: ``guidance`` for every request
    text_guidance: float | None = None


def read_weights_config(path: str | Path) -> dict:
    weights = find_weights_dir(path)
    config_path = weights / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{weights}: no {CONFIG_FILE}; expected a faceforge weights folder or checkpoint")
    return json.loads(config_path.read_text())


def sampler_defaults(config: dict) -> SamplerDefaults:
    """The sampler settings recorded with the weights, else the architecture's paper defaults."""
    recorded = config.get("sampler") or {}
    if config["arch"] == "mmface-dit":
        from modeling.diffusion import SamplerConfig

        paper = SamplerConfig()
        steps, guidance = recorded.get("steps", paper.steps), recorded.get("guidance", paper.guidance_scale)
        text = recorded.get("text_guidance")
        return SamplerDefaults(int(steps), float(guidance), None if text is None else float(text))
    from modeling.face_mogle import FaceMoGLEConfig

    cfg = FaceMoGLEConfig.from_dict(config["model"])
    guidance = cfg.sample_guidance if cfg.flux.guidance_embeds else cfg.cfg_scale
    return SamplerDefaults(int(recorded.get("steps", cfg.sample_steps)), float(recorded.get("guidance", guidance)))


def accepted_inputs(arch: str) -> dict[str, bool]:
    """Which conditions an architecture takes: MMFace-DiT text + a mask or a sketch, Face-MoGLE text + a mask."""
    return {"text": True, "mask": True, "sketch": arch == "mmface-dit"}


class FaceGenerator:
    def __init__(
        self,
        weights_dir: str | Path,
        device: str | torch.device = "cpu",
        weights: WeightsChoice = "auto",
        base_from: str | Path | None = None,
        default_layout: np.ndarray | None = None,
    ) -> None:
        """``weights``: "ema" (the averaged weights), "raw" (the optimizer's), "auto" (EMA when saved).
        ``base_from`` overrides the config's Face-MoGLE base (e.g. a base shipped inside a registered model).
        ``default_layout`` (labels): the face layout a Face-MoGLE request without a mask is generated on (the
        published model's most typical example, ``modeling.examples``); None: an all-background mask, the
        papers' text-to-face protocol."""
        from modeling.codecs import load_codec
        from modeling.text_encoders import load_text_encoder

        folder = find_weights_dir(resolve_checkpoint(weights_dir))  # a checkpoint's files match its manifest
        if weights not in ("auto", "ema", "raw"):
            raise ValueError(f"weights={weights!r}: choose ema, raw or auto")
        has_ema = (folder / EMA_FILE).is_file()
        if weights == "ema" and not has_ema:
            raise FileNotFoundError(f"{folder}: no {EMA_FILE} (trained without EMA); use weights=raw")
        use_ema = has_ema if weights == "auto" else weights == "ema"
        self.weights = "ema" if use_ema else "raw"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals (softmax tails) cost x86 CPUs tens of times the time
        state, self.config = load_weights(folder, ema=use_ema)
        self.folder = folder
        self.default_layout = default_layout
        self.arch = self.config["arch"]
        self.size = int(self.config["size"])
        self.defaults = sampler_defaults(self.config)
        codec, text = self.config["codec"], self.config["text_encoder"]
        self.codec = load_codec(codec, self.device)  # the entry itself: it may override the VAE's shift
        self.text = load_text_encoder(text.get("spec", text["name"]), self.device)
        base = str(base_from) if base_from is not None else self.config.get("base_from")
        self.model = self._build(state, base).to(self.device).eval()
        empty = self.text.encode([""])
        self.null = {"null_text": empty.seq[0], "null_text_mask": empty.mask[0], "null_pooled": empty.pooled[0]}

    def _build(self, state: dict, base_from: str | None) -> torch.nn.Module:
        if self.arch == "mmface-dit":
            from modeling.mmface_dit import MMFaceDiTConfig, build
            from modeling.weights import load_into

            model = build(MMFaceDiTConfig.from_dict(self.config["model"]))
            load_into(model, state)
            return model
        from modeling.face_mogle import FaceMoGLEConfig, build_face_mogle, load_trainable

        model = build_face_mogle(FaceMoGLEConfig.from_dict(self.config["model"]), base_from)
        load_trainable(model, state)
        return model

    def describe(self) -> dict:
        return {
            "arch": self.arch,
            "preset": self.config.get("preset"),
            "size": self.size,
            "accepts": accepted_inputs(self.arch),
            "default_steps": self.defaults.steps,
            "default_guidance": self.defaults.guidance,
            "text_guidance": self.defaults.text_guidance,
            "weights": self.weights,
            "codec": self.config["codec"]["name"],
            "text_encoder": self.config["text_encoder"]["name"],
        }

    def _encode(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return self.codec.encode(x.to(self.device))

    def check(self, request: GenerationRequest) -> None:
        """``ValueError`` saying what this model cannot take (a sketch for Face-MoGLE, a mask and a sketch)."""
        if request.sketch is not None and not accepted_inputs(self.arch)["sketch"]:
            raise ValueError(f"{self.arch} takes text and a mask, not a sketch; send a mask or use an MMFace-DiT model")
        if request.sketch is not None and request.mask is not None:
            raise ValueError(f"{self.arch} is conditioned on a mask or a sketch, not both; send one of them")

    def uses_default_layout(self, request: GenerationRequest) -> bool:
        """Whether the default face layout stands in for this request's missing mask (Face-MoGLE needs a mask;
        MMFace-DiT generates from text alone, its spatial condition dropped as in training)."""
        return self.arch == "face-mogle" and request.mask is None and self.default_layout is not None

    def default_guidance(self, request: GenerationRequest) -> float:
        """The guidance a request that names none gets: the model's text-only guidance when it has one and the
        request has neither a mask nor a sketch, else the model's guidance."""
        text_alone = self.arch == "mmface-dit" and request.mask is None and request.sketch is None
        if text_alone and self.defaults.text_guidance is not None:
            return self.defaults.text_guidance
        return self.defaults.guidance

    def _labels(self, request: GenerationRequest) -> np.ndarray:
        if request.mask is not None:
            return resize_labels(request.mask, self.size)
        if self.uses_default_layout(request):
            return resize_labels(self.default_layout, self.size)
        return np.zeros((self.size, self.size), np.uint8)

    @torch.no_grad()
    def generate(
        self, requests: list[GenerationRequest], steps: int | None = None, guidance: float | None = None
    ) -> list[np.ndarray]:
        """One (size, size, 3) uint8 image per request; ``steps``/``guidance`` None = the model's defaults (guidance
        per request: ``default_guidance``)."""
        if not requests:
            return []
        for request in requests:
            self.check(request)
        if self.device.type == "cpu":
            # the flag lives in each thread's floating-point state: a server samples in pool threads that may
            # predate this generator (Serve's replica builds it in one pool thread and samples in others)
            torch.set_flush_denormal(True)
        steps = steps or self.defaults.steps
        if guidance is None:
            scales = [self.default_guidance(r) for r in requests]
            guidance = scales[0] if len(set(scales)) == 1 else scales
        # bf16 matmuls on a GPU (as in training); fp32 on CPU, where bf16 is slower and less exact
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            latents = self._sample(requests, steps, guidance)
        pixels = ((self.codec.decode(latents.float()) + 1) * 127.5).round().clamp(0, 255).byte()
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy())

    def _sample(self, requests: list[GenerationRequest], steps: int, guidance: float | list[float]) -> torch.Tensor:
        emb = self.text.encode([r.prompt for r in requests])
        conditions = {"text": emb.seq, "text_mask": emb.mask, "pooled": emb.pooled}
        conditions |= {k: v.to(self.device) for k, v in self.null.items()}
        labels = [self._labels(r) for r in requests]
        seeds = [r.seed for r in requests]
        if self.arch == "mmface-dit":
            latents = self._sample_mmface(requests, labels, conditions, seeds, steps, guidance)
        else:
            from modeling.face_mogle import sample

            # an absent mask is the default layout, else all background (the papers' text-only protocol, SPEC §2)
            conditions["cond_latents"] = torch.stack([self._encode(mogle_condition_images(lab)) for lab in labels])
            cfg = self.model.cfg
            latents = sample(
                self.model,
                conditions,
                seeds,
                steps=steps,
                guidance=guidance if cfg.flux.guidance_embeds else None,
                cfg_scale=None if cfg.flux.guidance_embeds else guidance,
            )
        return latents

    def _sample_mmface(self, requests, labels, conditions, seeds, steps, guidance) -> torch.Tensor:
        from modeling.diffusion import ObjectiveConfig, SamplerConfig, sample

        blank = np.full((self.size, self.size, 3), 255, np.uint8)
        sketches = [grey_to_rgb(resize_image(r.sketch, self.size)) if r.sketch is not None else blank for r in requests]
        conditions["mask_latent"] = self._encode([labels_to_color(lab) for lab in labels])
        conditions["sketch_latent"] = self._encode(sketches)
        conditions["modality"] = torch.tensor([int(r.sketch is not None) for r in requests], device=self.device)
        # text-only requests: the spatial condition is dropped as in training (zeros)
        unconditioned = torch.tensor([r.mask is None and r.sketch is None for r in requests], device=self.device)
        conditions["mask_latent"][unconditioned] = 0
        if isinstance(guidance, list):  # text-only and conditioned requests in one batch: a scale per sample
            conditions["guidance_scale"] = torch.tensor(guidance, device=self.device)
            guidance = guidance[0]
        objective = ObjectiveConfig(kind="flow" if self.config["objective"] == "rfm" else "ddpm")
        return sample(self.model, conditions, seeds, objective, SamplerConfig(steps=steps, guidance_scale=guidance))
