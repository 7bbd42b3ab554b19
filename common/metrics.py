"""Classification metrics for one site and pooled over sites, from aggregates only.

A site computes its own metrics on its own test predictions and sends back only aggregates: its
metrics, its confusion matrix and, per class, a histogram of the predicted scores of positives and
negatives (`HIST_BINS` bins on [0, 1]). The coordinator pools sites by adding confusion matrices
(exact) and score histograms (AUC exact up to ties within a bin), so no per-image value ever leaves a
site. Binary tasks report the positive class (index 1); more classes report macro one-vs-rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc

HIST_BINS = 1000  # AUC from histograms differs from the exact one only by ties within 1/1000
METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, sensitivity, specificity and balanced accuracy from a C x C count matrix.

    Rows are true classes, columns predicted ones. Binary: sensitivity and specificity of class 1.
    More classes: macro averages of the one-vs-rest sensitivities and specificities.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = total - tp - fn - fp
    recall = np.array([_ratio(tp[c], tp[c] + fn[c]) for c in range(len(cm))])
    spec = np.array([_ratio(tn[c], tn[c] + fp[c]) for c in range(len(cm))])
    present = ~np.isnan(recall)
    if len(cm) == 2:
        sensitivity, specificity = recall[1], recall[0]
    else:
        sensitivity = float(np.nanmean(recall)) if present.any() else math.nan
        specificity = float(np.nanmean(spec)) if (~np.isnan(spec)).any() else math.nan
    return {
        "accuracy": _ratio(tp.sum(), total),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else math.nan,
    }


def score_histogram(labels: np.ndarray, probs: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Per class c, counts of score_c for samples of class c ([c, 1]) and of other classes ([c, 0])."""
    n_classes = probs.shape[1]
    idx = np.clip((probs * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros((n_classes, 2, bins), dtype=np.int64)
    for c in range(n_classes):
        is_pos = labels == c
        hist[c, 1] = np.bincount(idx[is_pos, c], minlength=bins)
        hist[c, 0] = np.bincount(idx[~is_pos, c], minlength=bins)
    return hist


def auc_from_histogram(hist: np.ndarray) -> float:
    """ROC AUC from score histograms (ties inside a bin count one half), binary or macro OvR."""
    hist = np.asarray(hist, dtype=np.float64)
    classes = [1] if hist.shape[0] == 2 else range(hist.shape[0])
    aucs = []
    for c in classes:
        neg, pos = hist[c, 0], hist[c, 1]
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            continue
        neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        aucs.append(float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg)))
    return float(np.mean(aucs)) if aucs else math.nan


def exact_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC with MONAI: binary on the positive class, macro one-vs-rest for more classes."""
    n_classes = probs.shape[1]
    if len(np.unique(labels)) < 2:
        return math.nan  # undefined on a test set with one class
    y_pred = torch.as_tensor(probs[:, 1] if n_classes == 2 else probs, dtype=torch.float64)
    if n_classes == 2:
        y = torch.as_tensor(labels, dtype=torch.float64)
    else:
        y = torch.nn.functional.one_hot(torch.as_tensor(labels), n_classes).double()
    return float(compute_roc_auc(y_pred, y, average="macro"))


def site_summary(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Everything a site reports about one evaluation: metrics plus the aggregates to pool them."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, probs.argmax(axis=1)), 1)
    return {
        "n_test": int(len(labels)),
        "auc": exact_auc(labels, probs),
        **metrics_from_confusion(confusion),
        "confusion": confusion,
        "score_hist": score_histogram(labels, probs),
    }


def pooled_summary(sites: Sequence[dict]) -> dict:
    """Metrics over all sites' test predictions together, computed from the sites' aggregates."""
    confusion = sum(np.asarray(s["confusion"]) for s in sites)
    hist = sum(np.asarray(s["score_hist"]) for s in sites)
    return {
        "n_test": int(np.asarray(confusion).sum()),
        "auc": auc_from_histogram(hist),
        **metrics_from_confusion(confusion),
    }


def public_metrics(summary: dict) -> dict:
    """The results.json view: n_test and the named metrics, NaN written as null."""
    out = {"n_test": int(summary["n_test"])}
    for name in METRIC_NAMES:
        value = float(summary[name])
        out[name] = None if math.isnan(value) else round(value, 6)
    return out
