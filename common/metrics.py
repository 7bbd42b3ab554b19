"""Classification metrics for one site and pooled over sites, from aggregates only.

A site's evaluation is summed up in aggregates: its confusion matrix and, per class, a histogram of
the predicted scores of positives and negatives. What a site actually releases of them is its policy's
choice (client.evaluation): the exact aggregates (`HIST_BINS` fine logit-spaced bins, which can reveal
single images' labels: simulated sites only, or a site that says so), the same counts with Gaussian
noise on coarse logit-spaced bins (`logit_edges`; differentially private), or its metrics alone. The
coordinator pools sites by adding the aggregates they release (`pooled_summary`); AUC from histograms
is exact up to ties within a bin. Binary tasks report the positive class (index 1); more classes
report macro one-vs-rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc

# exact releases: HIST_BINS score bins evenly spaced in logit(score) over [-EXACT_SPAN, EXACT_SPAN] (0.02
# apart), so AUC from them differs from the exact one only by ties within one such bin. Uniform bins on
# [0, 1] tied a confident model's scores crowding near 1: 4 points of pooled AUC lost for one DP diagnostic.
# A float32 softmax score stops at 1 - 6e-8 (logit 16.6), so the top bin holds only scores equal there.
HIST_BINS = 2000
EXACT_SPAN = 20.0
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


def score_histogram(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per class c, counts of score_c for samples of class c ([c, 1]) and of other classes ([c, 0]),
    in an exact release's bins (`histogram_edges("exact", HIST_BINS)`): every class, binary too."""
    edges = histogram_edges("exact", HIST_BINS)
    return binned_histogram(labels, probs, edges, classes=range(probs.shape[1])).astype(np.int64)


def logit_edges(bins: int, span: float = 12.0) -> np.ndarray:
    """`bins` + 1 score-bin edges on [0, 1], evenly spaced in logit(score) over [-span, span] (fine
    near 0 and 1, where a good model's scores crowd), with 0.5 an edge (`bins` even)."""
    if bins < 2 or bins % 2:
        raise ValueError(f"bins must be an even number >= 2, got {bins}")
    inner = 1.0 / (1.0 + np.exp(-np.linspace(-span, span, bins - 1)))
    return np.concatenate([[0.0], inner, [1.0]])


def histogram_edges(kind: str, bins: int) -> np.ndarray:
    """The score-bin edges of a release's histograms: an `exact` release's fine ones (HIST_BINS over
    logits +-EXACT_SPAN), a `dp_histogram`'s coarse ones (its policy's bins over logits +-12)."""
    return logit_edges(bins, span=EXACT_SPAN) if kind == "exact" else logit_edges(bins)


def binned_histogram(
    labels: np.ndarray, probs: np.ndarray, edges: np.ndarray, *, classes: Sequence[int] | None = None
) -> np.ndarray:
    """Counts K x 2 x B: per class k of `classes` of the scores of its positives ([k, 1]) and of the
    rest ([k, 0]); by default binary tasks give only class 1 (K = 1: class 0's histogram mirrors it)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if classes is None:
        classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    bins = len(edges) - 1
    out = np.zeros((len(classes), 2, bins), dtype=np.float64)
    for k, c in enumerate(classes):
        idx = np.clip(np.searchsorted(edges, probs[:, c], side="right") - 1, 0, bins - 1)
        out[k, 1] = np.bincount(idx[labels == c], minlength=bins)
        out[k, 0] = np.bincount(idx[labels != c], minlength=bins)
    return out


def binary_confusion(hist: np.ndarray) -> np.ndarray:
    """A binary task's confusion matrix from its class-1 histogram (1 x 2 x B, 0.5 the middle edge):
    predicted 1 where the score is at or above 0.5."""
    half = hist.shape[-1] // 2
    pos, neg = hist[0, 1], hist[0, 0]
    return np.array([[neg[:half].sum(), neg[half:].sum()], [pos[:half].sum(), pos[half:].sum()]])


def summary_from_counts(hist: np.ndarray, confusion: np.ndarray) -> dict:
    """Metrics from (possibly noised) aggregates: what the coordinator computes of a release."""
    confusion = np.asarray(confusion, dtype=np.float64)
    auc = auc_from_histogram(hist)
    return {
        "n_test": int(round(max(confusion.sum(), 0.0))),
        "auc": auc if math.isnan(auc) else min(max(auc, 0.0), 1.0),  # noised counts may stray past it
        **metrics_from_confusion(np.clip(confusion, 0.0, None)),
    }


def auc_from_histogram(hist: np.ndarray) -> float:
    """ROC AUC from score histograms (ties inside a bin count one half), binary or macro OvR.
    `hist` is C x 2 x B (binary: class 1's row is used) or 1 x 2 x B (binary, class 1 only)."""
    hist = np.asarray(hist, dtype=np.float64)
    classes = [1] if hist.shape[0] == 2 else range(hist.shape[0])
    aucs = []
    for c in classes:
        neg, pos = hist[c, 0], hist[c, 1]
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos <= 0 or n_neg <= 0:  # noised counts may sum below zero: undefined, not negative
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
    """Metrics over all sites' test predictions together, from the sites' aggregates (`confusion`,
    `score_hist`; the same bins at every site)."""
    confusion = sum(np.asarray(s["confusion"], dtype=np.float64) for s in sites)
    hist = sum(np.asarray(s["score_hist"], dtype=np.float64) for s in sites)
    return summary_from_counts(hist, confusion)


def public_metrics(summary: dict) -> dict:
    """The results.json view: n_test and the named metrics, NaN written as null."""
    out = {"n_test": int(summary["n_test"])}
    for name in METRIC_NAMES:
        value = float(summary[name])
        out[name] = None if math.isnan(value) else round(value, 6)
    return out


def pooled_auc_parts(
    labels_by_site: Sequence[np.ndarray], probs_by_site: Sequence[np.ndarray]
) -> dict | None:
    """The pooled AUC of a binary task split by where its (positive, negative) pairs come from:
    `within_sites` over the pairs of one site (the per-site AUCs weighted by each site's pairs),
    `across_sites` over the pairs of two different sites (which ranks one site's images against
    another's: comparable scores across scanners, and each site's share of positives, count there);
    `across_share` the fraction of pairs across sites. None for more than two classes, or where either
    part has no pairs. Ties count half, as in the AUC."""
    if any(p.shape[1] != 2 for p in probs_by_site):
        return None
    pos = [int((np.asarray(y) == 1).sum()) for y in labels_by_site]
    neg = [len(y) - n for y, n in zip(labels_by_site, pos, strict=True)]
    site_aucs = [exact_auc(y, p) for y, p in zip(labels_by_site, probs_by_site, strict=True)]
    pooled = exact_auc(np.concatenate(labels_by_site), np.concatenate(probs_by_site))
    return _split_by_pairs(pos, neg, site_aucs, pooled)


def pooled_auc_parts_from_histograms(hists: Sequence[np.ndarray]) -> dict | None:
    """`pooled_auc_parts` from what binary sites release: each site's score histograms (2 x B, the
    negatives' row then the positives', the same bins everywhere), as the coordinator pools them.
    Post-processing of the releases. Noised counts are taken at zero where they fall below it, so the
    parts are those of the pooled AUC of the clipped counts (close to the released AUC's)."""
    hists = [np.clip(np.asarray(h, dtype=np.float64), 0.0, None) for h in hists]
    pos = [float(h[1].sum()) for h in hists]
    neg = [float(h[0].sum()) for h in hists]
    site_aucs = [auc_from_histogram(h[None]) for h in hists]
    return _split_by_pairs(pos, neg, site_aucs, auc_from_histogram(sum(hists)[None]))


def _split_by_pairs(
    pos: Sequence[float], neg: Sequence[float], site_aucs: Sequence[float], pooled_auc: float
) -> dict | None:
    """The split from each site's class counts and AUC and the pooled AUC: the pooled AUC's concordant
    pairs minus each site's own are the ones across sites."""
    within_pairs = [p * n for p, n in zip(pos, neg, strict=True)]
    all_pairs = sum(pos) * sum(neg)
    across_pairs = all_pairs - sum(within_pairs)
    if sum(within_pairs) <= 0 or across_pairs <= 0:
        return None
    within = sum(auc * w for auc, w in zip(site_aucs, within_pairs, strict=True) if w > 0)
    return {
        "within_sites": round(within / sum(within_pairs), 6),
        "across_sites": round((pooled_auc * all_pairs - within) / across_pairs, 6),
        "across_share": round(across_pairs / all_pairs, 4),
    }
