"""Sampling proofs, for MMFace-DiT flow + Euler, MMFace-DiT DDPM + DPM-Solver++ and Face-MoGLE's FLUX flow.

1. A tiny model overfit on four fixed synthetic faces (32^2, the 2x2 pixel codec, fixed conditions, no condition
   dropout, AdamW + EMA, 400-500 steps) samples those faces back from the EMA weights. Mean PSNR reached on the
   2-core machine: flow 25.8 dB (min 25.4), DDPM 20.0 dB (min 17.1), Face-MoGLE 22.9 dB (min 19.9); asserted:
   21, 16.5 and 19 dB. A flipped sign on the prediction, or the initial weights instead of the EMA, stay under
   8 dB (pure noise scores ~5-7 dB); asserted under 12.
2. An overfit network does not reveal a wrong time direction or scale: having memorised its targets it reads the
   noise level off its input. So each sampler also runs the *exact* denoiser of one known target, written from
   the stated convention (flow: z_t = (1 - t) noise + t data, model time 1000 t; DDPM: eps at integer steps;
   FLUX: z = (1 - sigma) data + sigma noise, velocity noise - data). The training loss of that oracle is zero
   (so training uses the same convention), its samples are the target (> 40 dB), and the same oracle behind a
   reversed or mis-scaled time, or a flipped sign, loses at least 15 dB (measured 5-19 dB; asserted < 25).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from modeling.codecs import PixelUnshuffleCodec
from modeling.conditions import labels_to_color, mogle_condition_images
from modeling.ema import EMA
from pipelines.data.synth import render_face, sample_attributes

BARS = {"flow": 21.0, "ddpm": 16.5, "mogle": 19.0}  # dB, mean over the four faces; measured above
BROKEN_BAR = 12.0  # dB: every bug must leave the samples under this (noise is ~5-7 dB)
EXACT_BAR = 40.0  # dB: an exact denoiser through a correct sampler
EXACT_BROKEN_BAR = 25.0  # dB: the same denoiser behind a time or sign bug (measured 5-19 dB)
CODEC = PixelUnshuffleCodec(2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean(dim=(1, 2, 3))
    return (10 * torch.log10(4 / mse)).tolist()  # peak-to-peak 2 in [-1, 1]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def faces():
    """Four 32^2 synthetic faces: latents, the colour-mask latent, the 20 MoGLE condition latents, text."""
    images, masks, conds = [], [], []
    for k in range(4):
        rng = np.random.default_rng([7, k])
        image, labels = render_face(sample_attributes(rng), rng, 32)
        images.append(image)
        masks.append(labels_to_color(labels))
        conds.append(mogle_condition_images(labels))

    def encode(array: np.ndarray) -> torch.Tensor:
        return CODEC.encode(torch.from_numpy(np.asarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1)

    g = torch.Generator().manual_seed(0)
    return {
        "latent": encode(np.stack(images)),
        "mask_latent": encode(np.stack(masks)),
        "cond_latents": torch.stack([encode(c) for c in conds]),
        "text": torch.randn(4, 6, 384, generator=g),
        "text_mask": torch.ones(4, 6, dtype=torch.bool),
        "pooled": torch.nn.functional.normalize(torch.randn(4, 384, generator=g), dim=-1),
        "null_text": torch.randn(3, 384, generator=g),
        "null_text_mask": torch.ones(3, dtype=torch.bool),
        "null_pooled": torch.zeros(384),
        "null_cond_latent": encode(np.zeros((1, 32, 32, 3), np.uint8))[0],  # a black image: a dropped local mask
    }


def overfit(model: torch.nn.Module, loss_fn, steps: int, lr: float) -> EMA:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA.from_module(model, decay=0.98)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = loss_fn(generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(ema.tracked(model))
    return ema


class Broken(torch.nn.Module):
    """A network behind a bug: ``bug(inner, args, kwargs)`` calls it the wrong way."""

    def __init__(self, inner: torch.nn.Module, bug) -> None:
        super().__init__()
        self.inner, self.bug = inner, bug
        self.cfg = getattr(inner, "cfg", None)

    def forward(self, *args, **kwargs):
        return self.bug(self.inner, args, kwargs)


def _with(kwargs: dict, **changes) -> dict:
    return kwargs | changes


SIGN_BUG = {"prediction sign": lambda m, a, k: -m(*a, **k)}
MMFACE_FLOW_TIME_BUGS = {
    "time reversed (t=1 taken as noise)": lambda m, a, k: -m(*a, **_with(k, timestep=1000 - k["timestep"])),
    "time not scaled by 1000": lambda m, a, k: m(*a, **_with(k, timestep=k["timestep"] / 1000)),
}
MMFACE_DDPM_TIME_BUGS = {
    "timesteps reversed": lambda m, a, k: m(*a, **_with(k, timestep=999 - k["timestep"])),
    "timesteps as a fraction": lambda m, a, k: m(*a, **_with(k, timestep=k["timestep"] / 1000)),
}
MOGLE_TIME_BUGS = {
    "sigma reversed": lambda m, a, k: -m(a[0], 1 - a[1], *a[2:], **k),
    "sigma in thousandths": lambda m, a, k: m(a[0], a[1] * 1000, *a[2:], **k),
}


def _rows(target: torch.Tensor, batch: int) -> torch.Tensor:
    return target.repeat(batch // target.shape[0], *([1] * (target.dim() - 1)))  # CFG doubles the batch


class ExactFlow(torch.nn.Module):
    """The MMFace-DiT flow velocity that carries z_t = (1 - t) noise + t data to ``data`` (model time 1000 t)."""

    def __init__(self, data: torch.Tensor) -> None:
        super().__init__()
        self.data = data

    def forward(self, x, timestep, **_):
        t = (timestep / 1000.0).view(-1, 1, 1, 1)
        return (_rows(self.data, x.shape[0]) - x) / (1 - t).clamp(min=1e-4)


class ExactEps(torch.nn.Module):
    """The DDPM noise in x_k = sqrt(a_k) data + sqrt(1 - a_k) eps at integer step k."""

    def __init__(self, data: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.data, self.alphas = data, alphas

    def forward(self, x, timestep, **_):
        a = self.alphas[timestep.round().long().clamp(0, len(self.alphas) - 1)].view(-1, 1, 1, 1)
        return (x - a.sqrt() * _rows(self.data, x.shape[0])) / (1 - a).sqrt()


class ExactFluxVelocity(torch.nn.Module):
    """The FLUX velocity noise - data for packed z = (1 - sigma) data + sigma noise."""

    def __init__(self, packed: torch.Tensor, cfg) -> None:
        super().__init__()
        self.packed, self.cfg = packed, cfg

    def forward(self, x, sigma, *_, **__):
        s = sigma.view(-1, 1, 1)
        return (x - _rows(self.packed, x.shape[0])) / s.clamp(min=1e-4)


def _mmface_conditions(faces) -> dict:
    return {k: v for k, v in faces.items() if k not in ("cond_latents", "latent")} | {
        "modality": torch.zeros(4, dtype=torch.long)
    }


@pytest.mark.slow  # 400-500 optimizer steps
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_mmface_dit_samples_its_training_faces_back(faces, kind):
    from modeling.diffusion import ObjectiveConfig, SamplerConfig, sample, training_loss
    from modeling.mmface_dit import PRESETS, build

    objective = ObjectiveConfig(kind=kind, text_dropout=0.0, cond_dropout=0.0)
    conditions = _mmface_conditions(faces)
    batch = conditions | {"latent": faces["latent"]}
    torch.manual_seed(0)
    model = build(PRESETS["mmface-dit-tiny"])
    untrained = build(PRESETS["mmface-dit-tiny"]).eval()
    untrained.load_state_dict(model.state_dict())
    ema = overfit(model, lambda g: training_loss(model, batch, objective, g), 400 if kind == "flow" else 500, 2e-3)
    ema.copy_to(model)
    model.eval()
    sampler = SamplerConfig(steps=20, guidance_scale=1.0)

    def reach(network) -> list[float]:
        return psnr(sample(network, conditions, [0, 1, 2, 3], objective, sampler), batch["latent"])

    reached = reach(model)
    broken = {
        "sign": mean(reach(Broken(model, SIGN_BUG["prediction sign"]))),
        "initial weights": mean(reach(untrained)),
    }
    print(f"\nMMFace-DiT {kind}: PSNR {[round(r, 1) for r in reached]}; broken {broken}")
    assert mean(reached) > BARS[kind], reached
    assert max(broken.values()) < BROKEN_BAR, broken


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_mmface_dit_sampler_recovers_the_target_of_an_exact_denoiser(faces, kind):
    from modeling.diffusion import ObjectiveConfig, SamplerConfig, alphas_cumprod, sample, training_loss

    objective = ObjectiveConfig(kind=kind, text_dropout=0.0, cond_dropout=0.0)
    conditions = _mmface_conditions(faces)
    target = faces["latent"]
    exact = ExactFlow(target) if kind == "flow" else ExactEps(target, alphas_cumprod(objective).double())
    # the oracle of the stated convention is what training fits: its loss is zero
    loss = training_loss(exact, conditions | {"latent": target}, objective, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6
    sampler = SamplerConfig(steps=20, guidance_scale=1.0)
    assert min(psnr(sample(exact, conditions, [0, 1, 2, 3], objective, sampler), target)) > EXACT_BAR
    bugs = SIGN_BUG | (MMFACE_FLOW_TIME_BUGS if kind == "flow" else MMFACE_DDPM_TIME_BUGS)
    for name, bug in bugs.items():
        reached = mean(psnr(sample(Broken(exact, bug), conditions, [0, 1, 2, 3], objective, sampler), target))
        assert reached < EXACT_BROKEN_BAR, (name, reached)


@pytest.mark.slow  # 400-500 optimizer steps
def test_face_mogle_samples_its_training_faces_back(faces):
    from modeling.face_mogle import PRESETS, FaceMoGLE, sample, training_loss

    cfg = dataclasses.replace(PRESETS["face-mogle-tiny"], text_dropout=0.0, local_mask_dropout=0.0)
    torch.manual_seed(0)
    model = FaceMoGLE(cfg)
    untrained = FaceMoGLE(cfg).eval()
    untrained.load_state_dict(model.state_dict())
    ema = overfit(model, lambda g: training_loss(model, faces, cfg, g), 400, 2e-3)
    ema.copy_to(model)
    model.eval()
    conditions = {k: v for k, v in faces.items() if k != "latent"}

    def reach(network) -> list[float]:
        return psnr(sample(network, conditions, [0, 1, 2, 3], steps=20, cfg_scale=1.0), faces["latent"])

    reached = reach(model)
    broken = {
        "sign": mean(reach(Broken(model, SIGN_BUG["prediction sign"]))),
        "initial weights": mean(reach(untrained)),
    }
    print(f"\nFace-MoGLE: PSNR {[round(r, 1) for r in reached]}; broken {broken}")
    assert mean(reached) > BARS["mogle"], reached
    assert max(broken.values()) < BROKEN_BAR, broken


def test_face_mogle_sampler_recovers_the_target_of_an_exact_denoiser(faces):
    from modeling.face_mogle import PRESETS, pack_latents, sample, training_loss

    cfg = dataclasses.replace(PRESETS["face-mogle-tiny"], text_dropout=0.0, local_mask_dropout=0.0)
    target = faces["latent"]
    exact = ExactFluxVelocity(pack_latents(target), cfg)
    assert training_loss(exact, faces, cfg, torch.Generator().manual_seed(0)).item() < 1e-6
    conditions = {k: v for k, v in faces.items() if k != "latent"}
    assert min(psnr(sample(exact, conditions, [0, 1, 2, 3], steps=20, cfg_scale=1.0), target)) > EXACT_BAR
    for name, bug in (SIGN_BUG | MOGLE_TIME_BUGS).items():
        reached = mean(psnr(sample(Broken(exact, bug), conditions, [0, 1, 2, 3], steps=20, cfg_scale=1.0), target))
        assert reached < EXACT_BROKEN_BAR, (name, reached)
