"""How sure a per-site result is: bootstrap confidence intervals, calibration and ROC curves.

A hospital's test set is small (often a few hundred images), so a per-site AUC means little without an
interval. `bootstrap_intervals` resamples the test set with replacement, `samples` times (1000 by
default; numpy's seeded generator, so a study reproduces its intervals), **stratified by true class**
(each resample keeps the test set's class counts, as pROC does for AUC), and returns 95% percentile
intervals for AUC, sensitivity and specificity, computed on every resample exactly as
`common.metrics.site_summary` computes the point estimates (binary: class 1; more classes: macro
one-vs-rest). A resample is a vector of multiplicities, so every resample is evaluated at once with
numpy (no loop over resamples, no sort per resample).

    >>> ci = bootstrap_intervals(labels, probs, samples=1000, seed=0)
    >>> ci["auc"]               # [low, high]
    >>> paired_difference(labels, probs_federated, probs_local, seed=0)["auc"]   # same resamples

`expected_calibration_error` bins predictions into equal-width bins: binary tasks compare the
predicted probability of class 1 with the observed share of class 1 in each bin (a reliability
diagram's ECE); more classes use the top-label confidence against accuracy (Guo et al., 2017).
Where only a site's released aggregates are known (the coordinator of `fedward simulate`),
`calibration_from_histogram` and `auc_interval` give the ECE and an AUC interval from them.
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
CI_METRICS = ("auc", "sensitivity", "specificity")
_CHUNK = 250  # resamples evaluated together: bounds memory to about _CHUNK x n_test x 8 bytes x 4


def resample_counts(labels: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """`samples` x n multiplicities of a class-stratified bootstrap (each row sums to n per class)."""
    labels = np.asarray(labels)
    counts = np.zeros((samples, len(labels)), dtype=np.int32)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=samples)
    return counts


def weighted_binary_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of `weights` (B x n sample multiplicities); ties count one half.

    With all weights 1 this is the exact Mann-Whitney AUC (what MONAI's compute_roc_auc returns).
    NaN for a row without positives or without negatives.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = np.asarray(scores)[order], np.asarray(positive, dtype=bool)[order]
    w = np.asarray(weights, dtype=np.float64)[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each group of equal scores
    cum_pos = np.cumsum(w * pos, axis=1)[:, ends]
    cum_neg = np.cumsum(w * ~pos, axis=1)[:, ends]
    pos_g = np.diff(cum_pos, axis=1, prepend=0.0)
    neg_g = np.diff(cum_neg, axis=1, prepend=0.0)
    below = cum_neg - neg_g  # negatives scored strictly lower than the group
    n_pos, n_neg = cum_pos[:, -1], cum_neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_g * (below + 0.5 * neg_g)).sum(axis=1) / (n_pos * n_neg)


def _weighted_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUC, sensitivity and specificity for each row of `weights`, as common.metrics defines them."""
    n_classes = probs.shape[1]
    classes = [1] if n_classes == 2 else range(n_classes)
    aucs = np.stack([weighted_binary_auc(probs[:, c], labels == c, weights) for c in classes])
    with np.errstate(invalid="ignore"):
        auc = aucs[0] if n_classes == 2 else _nanmean(aucs, axis=0)
    # confusion matrices of every resample at once: rows true class, columns arg-max prediction
    pair = labels * n_classes + probs.argmax(axis=1)
    onehot = np.zeros((len(labels), n_classes * n_classes))
    onehot[np.arange(len(labels)), pair] = 1.0
    cm = (np.asarray(weights, dtype=np.float64) @ onehot).reshape(-1, n_classes, n_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fn, fp = cm.sum(axis=2) - tp, cm.sum(axis=1) - tp
    tn = cm.sum(axis=(1, 2))[:, None] - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, spec = tp / (tp + fn), tn / (tn + fp)
    if n_classes == 2:
        sensitivity, specificity = recall[:, 1], recall[:, 0]
    else:
        sensitivity, specificity = _nanmean(recall, axis=1), _nanmean(spec, axis=1)
    return {"auc": auc, "sensitivity": sensitivity, "specificity": specificity}


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    n = valid.sum(axis=axis)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def percentile_interval(values: np.ndarray, confidence: float) -> list[float] | None:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [round(float(lo), 6), round(float(hi), 6)]


def _bootstrap(labels, probs_list, samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    labels = np.asarray(labels, dtype=np.int64)
    probs_list = [np.asarray(p, dtype=np.float64) for p in probs_list]
    rng = np.random.default_rng(seed)
    out = [{k: [] for k in CI_METRICS} for _ in probs_list]
    for start in range(0, samples, _CHUNK):
        counts = resample_counts(labels, min(_CHUNK, samples - start), rng)
        for i, probs in enumerate(probs_list):
            for k, v in _weighted_metrics(labels, probs, counts).items():
                out[i][k].append(v)
    return [{k: np.concatenate(v) for k, v in o.items()} for o in out]


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, list[float] | None]:
    """95% (by default) percentile intervals {auc, sensitivity, specificity: [low, high]}.

    An interval is None when the metric is undefined on the test set (e.g. AUC with one class).
    """
    if len(labels) == 0:
        return dict.fromkeys(CI_METRICS)
    (draws,) = _bootstrap(labels, [probs], samples, seed)
    return {k: percentile_interval(v, confidence) for k, v in draws.items()}


def paired_difference(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, dict]:
    """Model a minus model b on the same test set: {metric: {"difference", "ci"}}.

    Both models are evaluated on the same resamples, so the interval reflects the difference itself
    (much narrower than comparing two separate intervals). An interval above 0 means a wins.
    """
    a, b = _bootstrap(labels, [probs_a, probs_b], samples, seed)
    full = np.ones((1, len(labels)))
    labels = np.asarray(labels, dtype=np.int64)
    pa = _weighted_metrics(labels, np.asarray(probs_a, dtype=np.float64), full)
    pb = _weighted_metrics(labels, np.asarray(probs_b, dtype=np.float64), full)
    out = {}
    for k in CI_METRICS:
        d = float(pa[k][0] - pb[k][0])
        out[k] = {
            "difference": None if math.isnan(d) else round(d, 6),
            "ci": percentile_interval(a[k] - b[k], confidence),
        }
    return out


def calibration(labels: np.ndarray, probs: np.ndarray, *, bins: int = 10) -> dict:
    """Expected calibration error and the reliability diagram's bins.

    Binary: predicted probability of class 1 against the observed share of class 1. More classes:
    top-label confidence against accuracy. ECE = sum over bins of (bin size / n) x |observed - predicted|.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return {"ece": None, "bins": []}
    if probs.shape[1] == 2:
        predicted, observed = probs[:, 1], (labels == 1).astype(np.float64)
    else:
        predicted, observed = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = np.clip((predicted * bins).astype(np.int64), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        mask = idx == b
        if not mask.any():
            continue
        pred_mean, obs_mean = float(predicted[mask].mean()), float(observed[mask].mean())
        ece += mask.mean() * abs(obs_mean - pred_mean)
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "n": int(mask.sum()),
                "predicted": round(pred_mean, 6),
                "observed": round(obs_mean, 6),
            }
        )
    return {"ece": round(float(ece), 6), "bins": table}


def calibration_from_histogram(
    neg: np.ndarray, pos: np.ndarray, edges: np.ndarray, *, bins: int = 10
) -> float | None:
    """A binary task's expected calibration error from its released score histograms (the counts of
    negatives and positives per score bin between `edges`, possibly noised: negative counts count as
    none): each score bin stands at its middle and joins the equal-width bin that middle falls in."""
    neg, pos = np.clip(np.asarray(neg, np.float64), 0, None), np.clip(np.asarray(pos, np.float64), 0, None)
    middle = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
    which = np.clip((middle * bins).astype(np.int64), 0, bins - 1)
    total = (neg + pos).sum()
    if total <= 0:
        return None
    ece = 0.0
    for b in range(bins):
        n_b = (neg + pos)[which == b].sum()
        if n_b > 0:
            predicted = float((middle * (neg + pos))[which == b].sum() / n_b)
            ece += n_b / total * abs(float(pos[which == b].sum() / n_b) - predicted)
    return round(float(ece), 6)


def auc_interval(
    auc: float, n_pos: float, n_neg: float, *, noise_sd: float = 0.0, ties: float = 0.0
) -> list[float] | None:
    """A 95% interval of an AUC known only from aggregates (no images to resample): Hanley and McNeil's
    (1982) standard error for `n_pos` positives and `n_neg` negatives, widened by the release's own
    noise (`noise_sd`, independent of the sampling), then by half the share of positive-negative pairs
    that tie in one histogram bin (`ties`: such a pair counts one half, its true order is unknown)."""
    if not (math.isfinite(auc) and n_pos >= 1 and n_neg >= 1):
        return None
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    half = 1.959964 * math.sqrt(max(var, 0.0) + noise_sd**2) + ties / 2
    return [round(max(auc - half, 0.0), 6), round(min(auc + half, 1.0), 6)]


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, *, bins: int = 10) -> float | None:
    return calibration(labels, probs, bins=bins)["ece"]


def roc_points(labels: np.ndarray, probs: np.ndarray, *, digits: int = 4) -> dict[str, list[float]] | None:
    """The ROC curve (false and true positive rates), for plotting: class 1 when binary, else the
    micro-average over one-vs-rest. None when the test set has one class."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        y, score = labels == 1, probs[:, 1]
    else:
        y = (labels[:, None] == np.arange(probs.shape[1])[None, :]).ravel()
        score = probs.ravel()
    from sklearn.metrics import roc_curve  # scikit-learn (with SciPy's statistics): loaded where plotted

    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=True)
    return {"fpr": np.round(fpr, digits).tolist(), "tpr": np.round(tpr, digits).tolist()}
