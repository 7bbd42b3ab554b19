"""Bootstrap intervals of a segmentation model's mean Dice and HD95, and paired differences of two
models on the same images (common.seg_metrics), on scores MONAI computes from real label maps."""

from __future__ import annotations

import numpy as np

from common.seg_metrics import (
    paired_score_difference,
    per_image_scores,
    score_intervals,
    segmentation_summary,
    sums_from_scores,
)


def _masks(rng: np.random.Generator, n: int, size: int = 24) -> np.ndarray:
    """n label maps, each a disc of class 1 (a quarter of them empty: images without a lesion)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        if i % 4:
            cy, cx, r = rng.integers(6, size - 6, 2).tolist() + [int(rng.integers(3, 6))]
            out[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def _scores(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.stack(per_image_scores(true, pred, 2), axis=1)


def _shifted(masks: np.ndarray, by: int) -> np.ndarray:
    return np.roll(masks, by, axis=2)


def test_intervals_hold_the_mean_narrow_with_more_images_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    true = _masks(rng, 200)
    scores = _scores(true, _shifted(true, 1))
    mean = segmentation_summary(sums_from_scores(scores[:, 0], scores[:, 1]))
    ci = score_intervals(scores, samples=500, seed=3)
    assert ci["dice"][0] < mean["dice"] < ci["dice"][1] and ci["hd95"][0] <= mean["hd95"] <= ci["hd95"][1]
    assert ci == score_intervals(scores, samples=500, seed=3)
    small = score_intervals(scores[:40], samples=500, seed=3)
    assert np.diff(small["dice"])[0] > np.diff(ci["dice"])[0]
    # the images without a lesion have no Dice (NaN) and do not count: the mean is over the 150 others
    assert np.isnan(scores[::4, 0]).all() and mean["n_test"] == 150


def test_a_better_model_wins_on_paired_resamples_and_equal_models_do_not():
    rng = np.random.default_rng(1)
    true = _masks(rng, 120)
    good, poor = _scores(true, _shifted(true, 1)), _scores(true, _shifted(true, 3))
    d = paired_score_difference(good, poor, samples=500, seed=0)
    assert d["dice"]["ci"][0] > 0 and d["hd95"]["ci"][1] < 0  # more overlap, nearer borders
    means = [segmentation_summary(sums_from_scores(s[:, 0], s[:, 1]))["dice"] for s in (good, poor)]
    assert abs(d["dice"]["difference"] - (means[0] - means[1])) < 1e-6
    same = paired_score_difference(good, good, samples=500, seed=0)
    assert same["dice"] == {"difference": 0.0, "ci": [0.0, 0.0]}


def test_no_image_with_a_lesion_gives_no_interval():
    true = np.zeros((10, 16, 16), dtype=np.int64)
    scores = _scores(true, true)
    assert score_intervals(scores, samples=200, seed=0) == {"dice": None, "hd95": None}
