"""Evaluation metrics for generated faces: the maths, and ``MetricSuite``, which streams batches through the judges.

``MetricSuite.update(generated, real=, masks=, prompts=)`` per batch, ``compute()`` once at the end, giving a flat
dict over ``METRIC_NAMES``; every name is present, holding a float or, when it cannot be computed, a string starting
with "skipped: " that says why (absent judge weights: "skipped: no weights at PATH"; missing inputs; too few images).

Definitions (images are compared as the caller passes them; ``real`` pairs with ``generated`` image by image):

- ``fid``: Fréchet distance between Gaussians fitted to Inception pool features of all generated and all real images
  (torchmetrics ``FrechetInceptionDistance``). Needs at least 2 of each.
- ``kid``: Kernel Inception Distance x 1000: unbiased MMD^2 with the cubic polynomial kernel on the same features,
  averaged over ``kid_subsets`` random subsets of ``min(kid_subset_size, n_generated, n_real)`` images each
  (torchmetrics ``KernelInceptionDistance``); subsets are drawn from a generator seeded with ``seed``.
- ``lpips``: mean LPIPS(generated, real) over pairs (AlexNet unless the judges say otherwise).
- ``ssim``: mean SSIM over pairs: 11x11 Gaussian window, sigma 1.5, data range 1 (torchmetrics).
- ``ms_ssim``: mean MS-SSIM over pairs, five scales with the standard betas (torchmetrics). Five scales of an 11-px
  window need a side of at least 176 px, so smaller pairs (e.g. 64 px) are first upsampled bilinearly, both images
  alike, until the shorter side is ``ms_ssim_min_size``: the metric keeps its standard definition, but its values
  are only comparable between runs at the same generated resolution.
- ``mask_acc``: mean over images of the fraction of pixels where the face parser's labels on the generated image
  (at the mask's size) equal the conditioning mask (CelebAMask-HQ labels 0..18).
- ``miou``: mean over images of that image's mIoU: IoU = |parse = c and mask = c| / |parse = c or mask = c| for
  each class c present in the parse or in the mask, averaged over those classes. Identical maps give 1.0; a class
  absent from both does not count; a class in only one of them counts as 0.
- ``clip_score``: mean over pairs of 100 * max(cos(CLIP image embedding, CLIP text embedding), 0), torchmetrics'
  ``CLIPScore`` definition.
- ``cmmd``: CMMD (Jayasumana et al. 2024) x 1000: MMD^2 between the L2-normalised CLIP image embeddings of all
  generated and all real images with a Gaussian RBF kernel, sigma = 10, as the paper's reference code computes it
  (means over all pairs, diagonals included; 0 for identical sets).
- ``dino_structure``: mean over pairs of the Splice structure distance: mean squared difference between the
  DINO-ViT last-layer key self-similarity matrices of the generated and the real image (0 for identical images).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from modeling.judges import Judges
from modeling.judges.bisenet import NUM_CLASSES
from modeling.judges.images import to_unit
from modeling.judges.inception import NUM_FEATURES

METRIC_NAMES = ("fid", "kid", "lpips", "ssim", "ms_ssim", "mask_acc", "miou", "clip_score", "cmmd", "dino_structure")
# Which judge each metric needs (SSIM and MS-SSIM need none).
JUDGE_OF = {
    "fid": "inception",
    "kid": "inception",
    "lpips": "lpips",
    "mask_acc": "face_parser",
    "miou": "face_parser",
    "clip_score": "clip",
    "cmmd": "clip",
    "dino_structure": "dino",
}
# Five 2x downsamplings must leave at least the 11-px window: torchmetrics requires side // 16 > 10.
MS_SSIM_MIN_SIZE = 176


def mask_scores(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> tuple[Tensor, Tensor]:
    """Per-image pixel accuracy and mIoU of ``(N, H, W)`` label maps -> two ``(N,)`` float tensors (see module doc)."""
    if pred.shape != target.shape:
        raise ValueError(f"label maps differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    for name, labels in (("prediction", pred), ("mask", target)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}"
            )
    n = pred.shape[0]
    p = pred.reshape(n, -1).long()
    t = target.reshape(n, -1).long()
    accuracy = (p == t).float().mean(dim=1)
    # Per-image confusion matrices in one bincount: image i's cell (true a, predicted b) is i*C*C + a*C + b.
    offsets = torch.arange(n, device=p.device).unsqueeze(1) * num_classes**2
    cells = (offsets + t * num_classes + p).flatten()
    confusion = torch.bincount(cells, minlength=n * num_classes**2).view(n, num_classes, num_classes).float()
    intersection = confusion.diagonal(dim1=1, dim2=2)
    union = confusion.sum(dim=1) + confusion.sum(dim=2) - intersection
    present = union > 0
    iou = torch.where(present, intersection / union.clamp(min=1), torch.zeros_like(union))
    return accuracy, iou.sum(dim=1) / present.sum(dim=1)


def clip_scores(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """``100 * max(cos, 0)`` per pair of ``(N, D)`` embeddings -> ``(N,)``."""
    cos = F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


def _mean_rbf(a: Tensor, b: Tensor, gamma: float, block: int = 1024) -> Tensor:
    """Mean of ``exp(-gamma * |a_i - b_j|^2)`` over all pairs, ``block`` rows at a time to bound memory."""
    b_sq = b.pow(2).sum(dim=1)
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], block):
        rows = a[start : start + block]
        d2 = (rows.pow(2).sum(dim=1, keepdim=True) + b_sq - 2.0 * rows @ b.T).clamp(min=0.0)
        total += torch.exp(-gamma * d2).sum()
    return total / (a.shape[0] * b.shape[0])


def cmmd(x: Tensor, y: Tensor, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD between two sets of ``(N, D)`` embeddings: ``scale * MMD^2`` with a Gaussian RBF kernel (see module doc)."""
    x, y = x.double(), y.double()
    gamma = 1.0 / (2.0 * sigma**2)
    return float(scale * (_mean_rbf(x, x, gamma) + _mean_rbf(y, y, gamma) - 2.0 * _mean_rbf(x, y, gamma)))


def structure_distances(self_sim_a: Tensor, self_sim_b: Tensor) -> Tensor:
    """Splice's structure distance per pair of ``(N, T, T)`` self-similarity matrices -> ``(N,)``."""
    return (self_sim_a.float() - self_sim_b.float()).pow(2).mean(dim=(1, 2))


def ms_ssim_inputs(x: Tensor, y: Tensor, min_size: int = MS_SSIM_MIN_SIZE) -> tuple[Tensor, Tensor]:
    """Upsample a pair of [0, 1] batches (bilinear) so the shorter side is ``min_size``; unchanged if already so."""
    h, w = x.shape[-2:]
    if min(h, w) >= min_size:
        return x, y
    size = (math.ceil(h * min_size / min(h, w)), math.ceil(w * min_size / min(h, w)))
    up = [F.interpolate(t, size=size, mode="bilinear", align_corners=False).clamp(0.0, 1.0) for t in (x, y)]
    return up[0], up[1]


class _Precomputed(nn.Module):
    """Identity "feature network" for torchmetrics' FID and KID: the suite runs Inception once per image and hands
    both metrics the same features, instead of each metric running its own forward pass."""

    num_features = NUM_FEATURES

    def forward(self, features: Tensor) -> Tensor:
        return features


@dataclass
class SuiteConfig:
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cmmd_sigma: float = 10.0
    ms_ssim_min_size: int = MS_SSIM_MIN_SIZE
    seed: int = 0  # KID's random subsets


class MetricSuite:
    """Accumulates every metric the loaded judges allow over a stream of batches; see the module doc."""

    def __init__(self, judges: Judges, config: SuiteConfig | None = None) -> None:
        self.judges = judges
        self.config = config or SuiteConfig()
        device = judges.device
        self._fid = FrechetInceptionDistance(feature=_Precomputed()).to(device)
        with warnings.catch_warnings():
            # KID warns that it keeps every feature vector; that is the point (2048 floats per image).
            warnings.simplefilter("ignore", UserWarning)
            self._kid = KernelInceptionDistance(feature=_Precomputed(), subsets=self.config.kid_subsets).to(device)
        self._ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
        self._ms_ssim = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0).to(device)
        self._sums = dict.fromkeys(("lpips", "mask_acc", "miou", "clip_score", "dino_structure"), 0.0)
        self._counts = dict.fromkeys(self._sums, 0)
        self._clip_generated: list[Tensor] = []
        self._clip_real: list[Tensor] = []
        self._n_generated = self._n_real = self._n_masks = self._n_prompts = 0

    @torch.no_grad()
    def update(
        self,
        generated: Tensor,
        real: Tensor | None = None,
        masks: Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        """One batch: ``generated`` ``(N, 3, H, W)`` uint8 or [0, 1] float; optional ``real`` (same shape, paired),
        ``masks`` ``(N, h, w)`` CelebAMask-HQ labels (the conditions), ``prompts`` (N captions)."""
        j = self.judges
        gen = to_unit(generated).to(j.device)
        n = gen.shape[0]
        ref = None
        if real is not None:
            ref = to_unit(real).to(j.device)
            if ref.shape != gen.shape:
                raise ValueError(
                    f"real images are {tuple(ref.shape)}, generated {tuple(gen.shape)}: pass paired batches of one "
                    "size (resize the real images to the generated size before update)"
                )
        if masks is not None and (masks.ndim != 3 or masks.shape[0] != n):
            raise ValueError(f"masks must be (N, H, W) labels for the {n} generated images, got {tuple(masks.shape)}")
        if prompts is not None and len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} generated images")

        self._n_generated += n
        if j.inception is not None:
            feats = j.inception(gen)
            self._fid.update(feats, real=False)
            self._kid.update(feats, real=False)
        if ref is not None:
            self._n_real += n
            self._update_pairs(gen, ref)
        if masks is not None:
            self._n_masks += n
            if j.face_parser is not None:
                target = masks.to(j.device)
                acc, miou = mask_scores(j.face_parser(gen, out_size=tuple(target.shape[-2:])), target)
                self._add("mask_acc", acc)
                self._add("miou", miou)
        if j.clip is not None and (prompts is not None or ref is not None):
            emb = j.clip.image_embeddings(gen)
            if prompts is not None:
                self._add("clip_score", clip_scores(emb, j.clip.text_embeddings(list(prompts))))
            if ref is not None:
                self._clip_generated.append(emb.cpu())
                self._clip_real.append(j.clip.image_embeddings(ref).cpu())
        if prompts is not None:
            self._n_prompts += n

    def _update_pairs(self, gen: Tensor, ref: Tensor) -> None:
        j = self.judges
        if j.inception is not None:
            feats = j.inception(ref)
            self._fid.update(feats, real=True)
            self._kid.update(feats, real=True)
        if j.lpips is not None:
            self._add("lpips", j.lpips(gen * 2 - 1, ref * 2 - 1))
        self._ssim.update(gen, ref)
        self._ms_ssim.update(*ms_ssim_inputs(gen, ref, self.config.ms_ssim_min_size))
        if j.dino is not None:
            self._add(
                "dino_structure", structure_distances(j.dino.key_self_similarity(gen), j.dino.key_self_similarity(ref))
            )

    def _add(self, name: str, values: Tensor) -> None:
        self._sums[name] += float(values.double().sum())
        self._counts[name] += int(values.numel())

    def compute(self) -> dict[str, float | str]:
        """Every name in ``METRIC_NAMES`` -> its value over all batches so far, or a "skipped: ..." reason."""
        results: dict[str, float | str] = {}
        for name in METRIC_NAMES:
            results[name] = self._skip_reason(name) or self._value(name)
        return results

    def _skip_reason(self, name: str) -> str | None:
        judge = JUDGE_OF.get(name)
        if judge is not None and getattr(self.judges, judge) is None:
            return self.judges.skipped.get(judge, f"skipped: no {judge} judge loaded")
        if self._n_generated == 0:
            return "skipped: no generated images given"
        needs_real = name in ("fid", "kid", "lpips", "ssim", "ms_ssim", "cmmd", "dino_structure")
        if needs_real and self._n_real == 0:
            return "skipped: no real images given"
        if name in ("fid", "kid", "cmmd") and min(self._n_generated, self._n_real) < 2:
            return f"skipped: needs at least 2 generated and 2 real images, got {self._n_generated} and {self._n_real}"
        if name in ("mask_acc", "miou") and self._n_masks == 0:
            return "skipped: no masks given"
        if name == "clip_score" and self._n_prompts == 0:
            return "skipped: no prompts given"
        return None

    def _value(self, name: str) -> float:
        if name == "fid":
            return float(self._fid.compute())
        if name == "kid":
            # KID draws its subsets with torch's global generator: seed a forked copy so results repeat and the
            # caller's random state is left alone.
            self._kid.subset_size = min(self.config.kid_subset_size, self._n_generated, self._n_real)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                kid_mean, _ = self._kid.compute()
            return 1000.0 * float(kid_mean)
        if name == "ssim":
            return float(self._ssim.compute())
        if name == "ms_ssim":
            return float(self._ms_ssim.compute())
        if name == "cmmd":
            return cmmd(torch.cat(self._clip_generated), torch.cat(self._clip_real), sigma=self.config.cmmd_sigma)
        return self._sums[name] / self._counts[name]
