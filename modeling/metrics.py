"""Evaluation metrics for generated faces: the maths, and ``MetricSuite``, which streams batches through the judges.

``MetricSuite.update(generated, real=, masks=, prompts=)`` per batch, ``compute()`` once at the end, giving a flat
dict over ``METRIC_NAMES``; every name is present, holding a float or, when it cannot be computed, a string starting
with "skipped: " that says why (absent judge weights: "skipped: no weights at PATH"; missing inputs; too few images).
Inside, ``score_batch`` turns one batch into ``BatchScores`` (per-image scores, Inception and CLIP embeddings) and
``MetricTally`` adds them up and fits the set-level metrics (FID, KID, CMMD) at the end; the two halves can run in
different processes (``pipelines.eval.paper`` scores on Ray actors and tallies in the driver).

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
  are only comparable between runs at the same generated resolution. ``SuiteConfig(ms_ssim_small="fewer_scales")``
  instead keeps the pixels and drops the coarsest scales that do not fit (``ms_ssim_plan``; ``MsSsimPlan.describe``
  says which was used, for reports).
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)
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
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
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


@dataclass(frozen=True)
class MsSsimPlan:
    """How MS-SSIM is computed at one image side: how many scales, their exponents, and any upsampling first."""

    scales: int
    betas: tuple[float, ...]
    upsample_to: int | None  # the shorter side after bilinear upsampling; None = images as they are

    def describe(self, side: int) -> str:
        if self.scales == len(MS_SSIM_BETAS) and self.upsample_to is None:
            return f"standard: {self.scales} scales, 11-px Gaussian window (sigma 1.5), at {side} px"
        if self.upsample_to is not None:
            return (
                f"adapted to {side} px: both images upsampled bilinearly to {self.upsample_to} px, then the standard "
                "5 scales with an 11-px Gaussian window (sigma 1.5); comparable only at the same generated size"
            )
        return (
            f"adapted to {side} px: {self.scales} of the standard 5 scales (the finest), betas "
            f"{[round(b, 4) for b in self.betas]} (the standard ones renormalised to sum 1), 11-px Gaussian window "
            "(sigma 1.5); comparable only at the same generated size, not with 5-scale values"
        )


def ms_ssim_plan(side: int, small: str = "upsample", min_size: int = MS_SSIM_MIN_SIZE) -> MsSsimPlan:
    """The MS-SSIM settings for images whose shorter side is ``side``: the standard five scales where they fit; below
    that, ``small="upsample"`` upsamples to ``min_size``, ``small="fewer_scales"`` keeps the pixels and uses the most
    scales that leave the 11-px window room at the coarsest one (the first betas, renormalised)."""
    if side >= min_size:
        return MsSsimPlan(len(MS_SSIM_BETAS), MS_SSIM_BETAS, None)
    if small == "upsample":
        return MsSsimPlan(len(MS_SSIM_BETAS), MS_SSIM_BETAS, min_size)
    if small != "fewer_scales":
        raise ValueError(f"ms_ssim_small={small!r}: choose upsample or fewer_scales")
    # torchmetrics checks side >= 10 * (scales - 1)^2 as well as the window fitting the coarsest scale
    scales = range(1, len(MS_SSIM_BETAS) + 1)
    fits = [s for s in scales if side // 2 ** (s - 1) > 10 and side >= 10 * max(1, s - 1) ** 2]
    if not fits:
        raise ValueError(f"images of side {side} px are smaller than SSIM's 11-px window")
    betas = MS_SSIM_BETAS[: max(fits)]
    return MsSsimPlan(len(betas), tuple(b / sum(betas) for b in betas), None)


class _Precomputed(nn.Module):
    """Identity "feature network" for torchmetrics' FID and KID: the features were computed batch by batch (once per
    image, shared by both metrics), and the set-level statistics are fitted to all of them at the end."""

    num_features = NUM_FEATURES

    def forward(self, features: Tensor) -> Tensor:
        return features


@dataclass
class SuiteConfig:
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cmmd_sigma: float = 10.0
    ms_ssim_min_size: int = MS_SSIM_MIN_SIZE
    ms_ssim_small: str = "upsample"  # below ms_ssim_min_size: "upsample" or "fewer_scales" (see ms_ssim_plan)
    seed: int = 0  # KID's random subsets


# Per-image scores a batch can carry, and the embeddings the set-level metrics (FID, KID, CMMD) are fitted to.
PER_IMAGE = ("lpips", "ssim", "ms_ssim", "mask_acc", "miou", "clip_score", "dino_structure")
EMBEDDINGS = ("inception_generated", "inception_real", "clip_generated", "clip_real")
_FLAGS = {"n_real": "has_real", "n_masks": "has_mask", "n_prompts": "has_prompt"}


@dataclass
class BatchScores:
    """What one batch contributes to the metrics: per-image scores (only those its judges and inputs allow) and
    embeddings, all on the CPU. ``columns``/``from_columns`` turn it into per-image columns and back, so batches can
    travel as rows (Ray Data) and be regrouped in any way before ``MetricTally.add``."""

    n_generated: int
    n_real: int = 0
    n_masks: int = 0
    n_prompts: int = 0
    per_image: dict[str, Tensor] = field(default_factory=dict)  # name -> (n,)
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # name -> (n, D)

    def columns(self) -> dict[str, np.ndarray]:
        """One entry per image in every column; the has_* flags say which inputs the image came with."""
        n = self.n_generated
        out: dict[str, np.ndarray] = {name: np.full(n, bool(getattr(self, count))) for count, name in _FLAGS.items()}
        for name, values in {**self.per_image, **self.embeddings}.items():
            if values.shape[0] != n:
                raise ValueError(f"{name} has {values.shape[0]} rows for {n} images; columns need one per image")
            out[name] = values.numpy()
        return out

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray]) -> BatchScores:
        counts = {count: int(np.asarray(columns[name]).sum()) for count, name in _FLAGS.items()}
        return cls(
            n_generated=len(columns["has_real"]),
            **counts,
            per_image={k: torch.from_numpy(np.array(columns[k], np.float64)) for k in PER_IMAGE if k in columns},
            embeddings={k: torch.from_numpy(np.stack(columns[k]).copy()) for k in EMBEDDINGS if k in columns},
        )


@torch.no_grad()
def score_batch(
    judges: Judges,
    generated: Tensor,
    real: Tensor | None = None,
    masks: Tensor | None = None,
    prompts: Sequence[str] | None = None,
    config: SuiteConfig | None = None,
) -> BatchScores:
    """One batch through the judges: ``generated`` ``(N, 3, H, W)`` uint8 or [0, 1] float; optional ``real`` (same
    shape, paired), ``masks`` ``(N, h, w)`` CelebAMask-HQ labels (the conditions), ``prompts`` (N captions)."""
    j, config = judges, config or SuiteConfig()
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

    scores = BatchScores(n, n_real=n if ref is not None else 0, n_masks=n if masks is not None else 0)
    scores.n_prompts = n if prompts is not None else 0
    values, embeddings = scores.per_image, scores.embeddings
    if j.inception is not None:
        embeddings["inception_generated"] = j.inception(gen)
    if ref is not None:
        if j.inception is not None:
            embeddings["inception_real"] = j.inception(ref)
        if j.lpips is not None:
            values["lpips"] = j.lpips(gen * 2 - 1, ref * 2 - 1)
        values["ssim"] = structural_similarity_index_measure(gen, ref, data_range=1.0, reduction="none")
        plan = ms_ssim_plan(min(gen.shape[-2:]), config.ms_ssim_small, config.ms_ssim_min_size)
        x, y = ms_ssim_inputs(gen, ref, plan.upsample_to) if plan.upsample_to else (gen, ref)
        values["ms_ssim"] = multiscale_structural_similarity_index_measure(
            x, y, data_range=1.0, betas=plan.betas, normalize="relu", reduction="none"
        )
        if j.dino is not None:
            values["dino_structure"] = structure_distances(
                j.dino.key_self_similarity(gen), j.dino.key_self_similarity(ref)
            )
    if masks is not None and j.face_parser is not None:
        target = masks.to(j.device)
        values["mask_acc"], values["miou"] = mask_scores(j.face_parser(gen, out_size=tuple(target.shape[-2:])), target)
    if j.clip is not None and (prompts is not None or ref is not None):
        emb = j.clip.image_embeddings(gen)
        if prompts is not None:
            values["clip_score"] = clip_scores(emb, j.clip.text_embeddings(list(prompts)))
        if ref is not None:
            embeddings["clip_generated"], embeddings["clip_real"] = emb, j.clip.image_embeddings(ref)
    scores.per_image = {k: v.detach().double().reshape(-1).cpu() for k, v in values.items()}
    scores.embeddings = {k: v.detach().float().cpu() for k, v in embeddings.items()}
    return scores


class MetricTally:
    """Adds up ``BatchScores`` and computes every metric at the end. It needs no judges, only which were loaded (and
    why the others were not), so it can run where the judges are not: the driver of a distributed evaluation."""

    def __init__(self, loaded: Sequence[str], skipped: dict[str, str], config: SuiteConfig | None = None) -> None:
        self.loaded, self.skipped = set(loaded), dict(skipped)
        self.config = config or SuiteConfig()
        self._sums = dict.fromkeys(PER_IMAGE, 0.0)
        self._counts = dict.fromkeys(PER_IMAGE, 0)
        self._embeddings: dict[str, list[Tensor]] = {name: [] for name in EMBEDDINGS}
        self._n_generated = self._n_real = self._n_masks = self._n_prompts = 0

    def add(self, scores: BatchScores) -> None:
        self._n_generated += scores.n_generated
        self._n_real += scores.n_real
        self._n_masks += scores.n_masks
        self._n_prompts += scores.n_prompts
        for name, values in scores.per_image.items():
            self._sums[name] += float(values.double().sum())
            self._counts[name] += int(values.numel())
        for name, values in scores.embeddings.items():
            self._embeddings[name].append(values)

    def compute(self) -> dict[str, float | str]:
        """Every name in ``METRIC_NAMES`` -> its value over all batches so far, or a "skipped: ..." reason."""
        return {name: self._skip_reason(name) or self._value(name) for name in METRIC_NAMES}

    def _skip_reason(self, name: str) -> str | None:
        judge = JUDGE_OF.get(name)
        if judge is not None and judge not in self.loaded:
            return self.skipped.get(judge, f"skipped: no {judge} judge loaded")
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

    def _all(self, name: str) -> Tensor:
        return torch.cat(self._embeddings[name])

    def _value(self, name: str) -> float:
        if name == "fid":
            fid = FrechetInceptionDistance(feature=_Precomputed())
            fid.update(self._all("inception_generated"), real=False)
            fid.update(self._all("inception_real"), real=True)
            return float(fid.compute())
        if name == "kid":
            return self._kid()
        if name == "cmmd":
            return cmmd(self._all("clip_generated"), self._all("clip_real"), sigma=self.config.cmmd_sigma)
        return self._sums[name] / self._counts[name]

    def _kid(self) -> float:
        generated, real = self._all("inception_generated"), self._all("inception_real")
        with warnings.catch_warnings():
            # KID warns that it keeps every feature vector; that is the point (2048 floats per image).
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(
                feature=_Precomputed(),
                subsets=self.config.kid_subsets,
                subset_size=min(self.config.kid_subset_size, len(generated), len(real)),
            )
        kid.update(generated, real=False)
        kid.update(real, real=True)
        # KID draws its subsets with torch's global generator: seed a forked copy so results repeat and the caller's
        # random state is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            kid_mean, _ = kid.compute()
        return 1000.0 * float(kid_mean)


class MetricSuite:
    """Every metric the loaded judges allow over a stream of batches: ``score_batch`` per batch into a
    ``MetricTally``; see the module doc."""

    def __init__(self, judges: Judges, config: SuiteConfig | None = None) -> None:
        self.judges = judges
        self.config = config or SuiteConfig()
        self.tally = MetricTally(judges.loaded(), judges.skipped, self.config)

    def update(
        self,
        generated: Tensor,
        real: Tensor | None = None,
        masks: Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        """One batch; the arguments are ``score_batch``'s."""
        self.tally.add(score_batch(self.judges, generated, real, masks, prompts, self.config))

    def compute(self) -> dict[str, float | str]:
        return self.tally.compute()
