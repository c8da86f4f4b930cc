"""Frozen image codecs: images in [-1, 1] <-> normalised latents ``(z - shift) * scale``.

Two implementations share one small interface:

- ``PixelUnshuffleCodec`` (default, no weights): a lossless space-to-depth rearrangement. With factor 4 a
  3x64x64 image becomes a 48x16x16 latent; decoding gives the exact pixels back. It is the embedded stand-in
  that lets the whole system run with no pretrained VAE, and it is honest about it (``name == "pixel"``).
- ``VAECodec``: a diffusers ``AutoencoderKL`` loaded from a local folder (FLUX VAE: 16 channels, /8,
  scale 0.3611, shift 0.1159; SD VAEs: 4 channels, scale 0.18215, no shift). Shift and scale come from its
  config; a ``shift`` override replaces the config's shift, for models trained without it (the released
  MMFace-DiT checkpoints). Encoding uses the posterior mean, so precomputed latents are deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class LatentCodec(nn.Module):
    """A frozen codec. ``encode``: (B,3,H,W) in [-1,1] -> (B,C,H/f,W/f); ``decode`` inverts it."""

    name: str
    latent_channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        if size % self.downsample:
            raise ValueError(f"image size {size} is not a multiple of the codec's downsampling {self.downsample}")
        return (self.latent_channels, size // self.downsample, size // self.downsample)

    def describe(self) -> dict:
        """``spec`` is what ``load_codec`` takes to load this codec again."""
        return {
            "name": self.name,
            "spec": getattr(self, "path", self.name),
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }


class PixelUnshuffleCodec(LatentCodec):
    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        self.factor = factor
        self.name = "pixel" if factor == 4 else f"pixel:{factor}"
        self.latent_channels = 3 * factor * factor
        self.downsample = factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor).clamp(-1, 1)


class VAECodec(LatentCodec):
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, shift: float | None = None) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: no config.json; expected a local diffusers AutoencoderKL folder "
                "(e.g. the 'vae' subfolder of FLUX.1-dev)"
            )
        self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        self.vae.requires_grad_(False).eval()
        config = self.vae.config
        self.name = f"vae:{path.name}"
        self.path = str(path.resolve())
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0) if shift is None else float(shift)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.vae.dtype)
        z = self.vae.encode(images).latent_dist.mode()
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample.clamp(-1, 1)

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, "scale": self.scale, "shift": self.shift}


def load_codec(spec: str | dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentCodec:
    """``"pixel"`` (factor 4), ``"pixel:F"``, a path to a local diffusers AutoencoderKL folder, or a codec entry
    of a weights config (``describe()``'s dict: ``spec``, and an optional ``shift`` that overrides the VAE's)."""
    shift = None
    if isinstance(spec, dict):
        shift = spec.get("shift")
        spec = spec["spec"] if "spec" in spec else spec["name"]
    if spec == "pixel" or spec.startswith("pixel:"):
        if shift:
            raise ValueError(f"codec {spec!r} has no latent shift, but its entry asks for shift {shift}")
        factor = int(spec.split(":", 1)[1]) if ":" in spec else 4
        return PixelUnshuffleCodec(factor).to(device)
    return VAECodec(spec, dtype=dtype, shift=shift).to(device)
