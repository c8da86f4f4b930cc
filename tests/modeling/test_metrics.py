"""The metric maths and MetricSuite's bookkeeping, without judges (SSIM and MS-SSIM need none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from modeling.judges import Judges
from modeling.metrics import (
    METRIC_NAMES,
    MS_SSIM_MIN_SIZE,
    MetricSuite,
    clip_scores,
    cmmd,
    mask_scores,
    ms_ssim_inputs,
    structure_distances,
)


def random_masks(n: int, size: int, seed: int) -> torch.Tensor:
    """Blocky label maps (8x8 cells of random classes 0..18), like parts of a face rather than salt and pepper."""
    cells = torch.randint(0, 19, (n, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))
    return cells.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


def numpy_mask_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Pixel accuracy and mIoU of one pair of maps, class by class, straight from the definition."""
    ious = []
    for c in np.union1d(np.unique(pred), np.unique(target)):
        ious.append(np.logical_and(pred == c, target == c).sum() / np.logical_or(pred == c, target == c).sum())
    return float((pred == target).mean()), float(np.mean(ious))


def test_mask_scores_match_the_definition_and_are_one_on_identical_maps():
    masks = random_masks(3, 64, seed=0)
    acc, miou = mask_scores(masks, masks)
    assert torch.equal(acc, torch.ones(3)) and torch.equal(miou, torch.ones(3))
    shifted = torch.roll(masks, shifts=4, dims=2)
    acc, miou = mask_scores(shifted, masks)
    assert bool((acc < 1).all()) and bool((miou < 1).all())
    for i in range(3):
        expected = numpy_mask_scores(shifted[i].numpy(), masks[i].numpy())
        assert (float(acc[i]), float(miou[i])) == pytest.approx(expected, rel=1e-6)


def test_mask_scores_reject_labels_out_of_range():
    masks = random_masks(1, 16, seed=1)
    with pytest.raises(ValueError, match="mask labels must be in 0..18"):
        mask_scores(masks, masks + 19)


def test_cmmd_is_the_rbf_mmd_of_the_paper():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.normal(loc=0.3, size=(9, 8))
    y /= np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * 10.0**2)).mean()

    expected = 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))
    assert cmmd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-9)
    assert cmmd(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-12)
    assert expected > 0


def test_clip_scores_and_structure_distances():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(clip_scores(a, b), torch.tensor([100.0, 0.0, 0.0]))  # negative cosine clamps to 0
    s = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(structure_distances(s, s), torch.zeros(2))
    torch.testing.assert_close(structure_distances(s, s + 0.5), torch.full((2,), 0.25))


def test_ms_ssim_inputs_upsample_only_small_images():
    small = torch.rand(2, 3, 64, 48)
    x, y = ms_ssim_inputs(small, small)
    assert min(x.shape[-2:]) == MS_SSIM_MIN_SIZE and x.shape == y.shape
    big = torch.rand(1, 3, 200, 180)
    assert ms_ssim_inputs(big, big)[0] is big


def test_ssim_and_ms_ssim_through_the_suite():
    images = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    same = MetricSuite(Judges())
    same.update(images, images)
    result = same.compute()
    assert result["ssim"] == pytest.approx(1.0, abs=1e-6) and result["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1).round().to(torch.uint8)
    worse = MetricSuite(Judges())
    worse.update(blurred, images)
    result = worse.compute()
    assert 0.0 < result["ssim"] < 0.9 and 0.0 < result["ms_ssim"] < 1.0


def test_suite_reports_every_metric_and_why_it_skipped():
    suite = MetricSuite(Judges(skipped={"clip": "skipped: no weights at /models/clip"}))
    assert set(suite.compute()) == set(METRIC_NAMES)
    assert suite.compute()["ssim"] == "skipped: no generated images given"
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    suite.update(images)
    result = suite.compute()
    assert result["ssim"] == "skipped: no real images given"
    assert result["clip_score"] == "skipped: no weights at /models/clip"
    assert result["fid"] == "skipped: no inception judge loaded"
    suite.update(images, images)
    assert suite.compute()["ssim"] == pytest.approx(1.0)


def test_suite_rejects_mismatched_batches():
    suite = MetricSuite(Judges())
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="resize the real images"):
        suite.update(images, torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 prompts for 2 generated images"):
        suite.update(images, prompts=["one"])
    with pytest.raises(ValueError, match="float images must be in"):
        suite.update(images.float() + 255.0)  # a [0, 255] float batch


def test_ms_ssim_with_fewer_scales_keeps_the_pixels_of_small_images():
    from modeling.metrics import SuiteConfig, ms_ssim_plan

    assert ms_ssim_plan(256, "fewer_scales").scales == 5
    assert ms_ssim_plan(64, "upsample").upsample_to == MS_SSIM_MIN_SIZE
    plan = ms_ssim_plan(32, "fewer_scales")
    assert (plan.scales, plan.upsample_to) == (2, None) and sum(plan.betas) == pytest.approx(1.0)
    assert "3 of the standard 5" in ms_ssim_plan(64, "fewer_scales").describe(64)
    images = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    suite = MetricSuite(Judges(), SuiteConfig(ms_ssim_small="fewer_scales"))
    suite.update(images, images)
    assert suite.compute()["ms_ssim"] == pytest.approx(1.0, abs=1e-6)


def test_batch_scores_travel_as_columns():
    from modeling.metrics import BatchScores, MetricTally, score_batch

    images = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    scores = score_batch(Judges(), images, images.flip(0), masks=random_masks(4, 32, seed=4))
    columns = scores.columns()
    assert columns["ssim"].shape == (4,) and bool(columns["has_real"].all()) and bool(columns["has_mask"].all())
    whole, rows = MetricTally((), {}), MetricTally((), {})
    whole.add(scores)
    for i in range(4):  # regrouped one image at a time, as rows arriving from Ray
        rows.add(BatchScores.from_columns({k: v[i : i + 1] for k, v in columns.items()}))
    for name in ("ssim", "ms_ssim"):
        assert rows.compute()[name] == pytest.approx(whole.compute()[name], rel=1e-12)
    assert rows.compute()["fid"] == whole.compute()["fid"] == "skipped: no inception judge loaded"
