"""A model's metrics on one test set where every prediction is at hand (in process, nothing released):
the point estimates with 95% bootstrap intervals, and for classification calibration and ROC points.

`fedward study` (server.study.evaluate) and a hospital's own `fedward site validate`
(client.site_validate) both compute their numbers here.

    classification_block(labels, probs, samples=1000, seed=0, bins=10, roc=True)
    segmentation_block(scores, samples=1000, seed=0)   # scores: N x 2 x K, each image's Dice and HD95
"""

from __future__ import annotations

import numpy as np

from common.metrics import public_metrics, site_summary
from common.seg_metrics import score_intervals, segmentation_summary, sums_from_scores
from common.uncertainty import bootstrap_intervals, calibration, roc_points


def classification_block(
    labels: np.ndarray, probs: np.ndarray, *, samples: int, seed: int, bins: int, roc: bool
) -> dict:
    """AUC, accuracy, sensitivity, specificity, balanced accuracy; `ci` (stratified bootstrap), ECE and
    the calibration bins; with `roc` the ROC points."""
    out = public_metrics(site_summary(labels, probs))
    out["ci"] = bootstrap_intervals(labels, probs, samples=samples, seed=seed)
    cal = calibration(labels, probs, bins=bins)
    out["ece"], out["calibration"] = cal["ece"], cal["bins"]
    if roc:
        out["roc"] = roc_points(labels, probs)
    return out


def segmentation_block(scores: np.ndarray, *, samples: int, seed: int) -> dict:
    """Mean Dice and HD95 over the images (each class's defined values, macro over classes) and `ci`."""
    out = segmentation_summary(sums_from_scores(scores[:, 0], scores[:, 1]), n_test=len(scores))
    out["ci"] = score_intervals(scores, samples=samples, seed=seed)
    return out
