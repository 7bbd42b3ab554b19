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
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.keys import Met

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
    with np.errstate(invalid="ignore"):
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
