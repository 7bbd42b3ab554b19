"""Segmentation metrics: per-image Dice and 95% Hausdorff distance (MONAI's DiceMetric and
HausdorffDistanceMetric), and the sums a site releases and a coordinator pools.

For each image and each foreground class c (1..K-1; the background is class 0): Dice between the
predicted and the true mask of c, and HD95 in pixels (voxels for volumes). An image whose true mask of
c is empty has no Dice or HD95 for c (MONAI gives NaN there; such images are left out of c's sums, as
are images whose prediction of c is empty for HD95). A site's aggregate per class is (sum, count) of
each, so sites pool by adding: the pooled Dice is the Dice averaged over every counted image of every
site, not an average of the sites' averages.

    sums = segmentation_sums(true_masks, predicted_masks, num_classes=2)
    segmentation_summary(sums)   # {"n_test", "dice", "hd95"}: means, macro over the foreground classes

Where every image's scores are at hand (`fedward study`, in process), `score_intervals` gives 95%
bootstrap intervals of the mean Dice and HD95 (images resampled with replacement, numpy's seeded
generator) and `paired_score_difference` the difference of two models on the same resamples.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from common.keys import Met
from common.uncertainty import CONFIDENCE, percentile_interval

# the sums per foreground class, and the record key each travels under in a site's evaluation reply
SUM_KEYS = {"dice_sum": Met.DICE_SUM, "dice_n": Met.DICE_N, "hd95_sum": Met.HD95_SUM, "hd95_n": Met.HD95_N}


def per_image_scores(true: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(dice, hd95): N x (K-1) arrays of each image's scores per foreground class, NaN where undefined.
    `true` and `pred` are N x H x W (or N x D x H x W) label maps."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    t = one_hot(torch.as_tensor(true, dtype=torch.long)[:, None], num_classes)
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[:, None], num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t)
    empty_pred = p[:, 1:].flatten(2).sum(-1) == 0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns of every empty mask: they become NaN below, by design
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, t)
    hd = torch.where(empty_pred | ~torch.isfinite(hd), torch.nan, hd)
    return dice.double().numpy(), hd.double().numpy()


def sums_from_scores(dice: np.ndarray, hd95: np.ndarray) -> dict[str, np.ndarray]:
    """Per foreground class: the sum and count of the defined Dice and HD95 values."""
    return {
        "dice_sum": np.nansum(dice, axis=0), "dice_n": np.isfinite(dice).sum(axis=0).astype(np.float64),
        "hd95_sum": np.nansum(hd95, axis=0), "hd95_n": np.isfinite(hd95).sum(axis=0).astype(np.float64),
    }  # fmt: skip


def segmentation_sums(true: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    return sums_from_scores(*per_image_scores(true, pred, num_classes))


def segmentation_summary(sums: dict[str, np.ndarray], n_test: int | None = None) -> dict:
    """Mean Dice and HD95 (macro over the foreground classes) from (possibly noised, possibly pooled)
    sums; None where no image counted."""

    def mean(total: np.ndarray, count: np.ndarray) -> float | None:
        per_class = [
            t / c for t, c in zip(np.atleast_1d(total), np.atleast_1d(count), strict=True) if c >= 0.5
        ]
        return float(np.mean(per_class)) if per_class else None

    dice = mean(sums["dice_sum"], sums["dice_n"])
    return {
        "n_test": int(round(max(float(np.max(sums["dice_n"])) if n_test is None else n_test, 0))),
        "dice": None if dice is None or math.isnan(dice) else min(max(dice, 0.0), 1.0),
        "hd95": mean(sums["hd95_sum"], sums["hd95_n"]),
    }


def _weighted_means(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The macro mean over classes of each row of `weights` (B x N image multiplicities) applied to
    `scores` (N x K, NaN where undefined): per class the weighted mean of its defined scores, then the
    mean over the classes that have one. With weights 1 it is segmentation_summary's mean."""
    finite = np.isfinite(scores)
    total = weights @ np.where(finite, scores, 0.0)
    count = weights @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(count > 0, total / np.maximum(count, 1e-12), np.nan)
    defined = np.isfinite(per_class)
    return np.where(
        defined.any(axis=1), np.where(defined, per_class, 0).sum(1) / np.maximum(defined.sum(1), 1), np.nan
    )


def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)


def score_intervals(
    scores: np.ndarray, *, samples: int = 1000, seed: int = 0, confidence: float = CONFIDENCE
) -> dict[str, list[float] | None]:
    """{dice, hd95: [low, high]} percentile intervals of the means, from `scores` N x 2 x K (each
    image's Dice and HD95 per foreground class, as per_image_scores gives them, stacked)."""
    if len(scores) == 0:
        return {"dice": None, "hd95": None}
    weights = _resamples(len(scores), samples, seed)
    return {k: percentile_interval(_weighted_means(scores[:, i], weights), confidence) for i, k in enumerate(("dice", "hd95"))}  # fmt: skip


def paired_score_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, dict]:
    """Model a minus model b on the same images (N x 2 x K each): {dice, hd95: {difference, ci}},
    both evaluated on the same resamples. A Dice interval above 0 means a wins; for HD95 below 0."""
    weights = _resamples(len(scores_a), samples, seed)
    one = np.ones((1, len(scores_a)))
    out = {}
    for i, k in enumerate(("dice", "hd95")):
        d = float(_weighted_means(scores_a[:, i], one)[0] - _weighted_means(scores_b[:, i], one)[0])
        draws = _weighted_means(scores_a[:, i], weights) - _weighted_means(scores_b[:, i], weights)
        out[k] = {
            "difference": None if math.isnan(d) else round(d, 6),
            "ci": percentile_interval(draws, confidence),
        }
    return out
