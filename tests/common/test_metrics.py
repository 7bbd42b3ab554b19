"""Metrics agree with scikit-learn on fixed inputs; pooled metrics from aggregates match pooling images."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    recall_score,
    roc_auc_score,
)

from common.metrics import (
    auc_from_histogram,
    pooled_auc_parts,
    pooled_auc_parts_from_histograms,
    pooled_summary,
    public_metrics,
    site_summary,
)


def _binary(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, np.stack([1 - p1, p1], axis=1)


def test_binary_site_metrics_match_sklearn():
    y, probs = _binary(0)
    s = site_summary(y, probs)
    pred = probs.argmax(1)
    assert s["n_test"] == 400
    assert s["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert s["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert s["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert s["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_multiclass_site_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    s = site_summary(y, probs)
    pred = probs.argmax(1)
    assert s["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))


def test_pooled_metrics_from_site_aggregates_match_pooled_predictions():
    sites = [_binary(seed, n) for seed, n in ((2, 150), (3, 40), (4, 500))]
    pooled = pooled_summary([site_summary(y, p) for y, p in sites])
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    pred = p_all.argmax(1)
    assert pooled["n_test"] == 690
    assert pooled["auc"] == pytest.approx(roc_auc_score(y_all, p_all[:, 1]), abs=2e-3)
    assert pooled["accuracy"] == pytest.approx(accuracy_score(y_all, pred))
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_all, pred))


def test_a_confident_models_pooled_auc_from_exact_releases_is_its_own():
    # float32 scores crowding near 1 (median 0.9993), as a model trained to convergence gives: uniform
    # 1/1000 bins would tie most of them in the top bin (8 points of AUC lost); the logit-spaced ones do not
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 600)
    p1 = (1 / (1 + np.exp(-rng.normal(6.0 + 3.0 * y, 2.0)))).astype(np.float32).astype(np.float64)
    probs = np.stack([1 - p1, p1], axis=1)
    sites = [site_summary(y[:300], probs[:300]), site_summary(y[300:], probs[300:])]
    assert pooled_summary(sites)["auc"] == pytest.approx(roc_auc_score(y, p1), abs=5e-4)
    assert roc_auc_score(y, np.floor(p1 * 1000)) < roc_auc_score(y, p1) - 0.05  # what uniform bins gave


def test_histogram_auc_is_exact_without_ties_inside_bins():
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.05, 0.42, 0.61, 0.93, 0.7, 0.2])
    s = site_summary(y, np.stack([1 - p1, p1], 1))
    assert auc_from_histogram(s["score_hist"]) == pytest.approx(roc_auc_score(y, p1), abs=1e-12)


def test_single_class_site_has_undefined_auc_written_as_null():
    y = np.zeros(10, dtype=int)
    probs = np.tile([0.7, 0.3], (10, 1))
    out = public_metrics(site_summary(y, probs))
    assert out["auc"] is None
    assert out["specificity"] == 1.0
    assert out["sensitivity"] is None


def _pairs_by_hand(ys, scores):
    """Share of (positive, negative) pairs ranked right (ties half), within one site and across two."""
    site = np.concatenate([[i] * len(y) for i, y in enumerate(ys)])
    y, s = np.concatenate(ys), np.concatenate(scores)
    right = {True: 0.0, False: 0.0}
    count = {True: 0, False: 0}
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            same = bool(site[i] == site[j])
            count[same] += 1
            right[same] += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    return right[True] / count[True], right[False] / count[False], count[False] / (count[True] + count[False])


def test_pooled_auc_splits_into_pairs_within_and_across_sites_with_ties_counted_half():
    rng = np.random.default_rng(3)
    ys = [rng.integers(0, 2, n) for n in (30, 50, 20)]
    # coarse scores (many ties) and a site whose scores sit lower: within and across differ
    scores = [
        np.round(rng.uniform(0, 1, len(y)) * 0.5 + 0.4 * y - 0.3 * (k == 1), 1) for k, y in enumerate(ys)
    ]
    parts = pooled_auc_parts(ys, [np.stack([1 - s, s], axis=1) for s in scores])
    within, across, share = _pairs_by_hand(ys, scores)
    assert parts["within_sites"] == pytest.approx(within, abs=1e-6)
    assert parts["across_sites"] == pytest.approx(across, abs=1e-6)
    assert parts["across_share"] == pytest.approx(share, abs=1e-4)
    assert abs(parts["within_sites"] - parts["across_sites"]) > 0.05  # the offset shows across sites only
    pooled = roc_auc_score(np.concatenate(ys), np.concatenate(scores))
    assert pooled == pytest.approx(within * (1 - share) + across * share, abs=1e-6)


def test_the_coordinator_splits_the_pooled_auc_from_the_sites_histograms_as_from_their_predictions():
    rng = np.random.default_rng(4)
    ys = [rng.integers(0, 2, n) for n in (40, 60, 25)]
    # scores in tenths (ties, never two values in one of the exact release's bins), one site's lower
    scores = [
        np.round(np.clip(rng.uniform(0, 0.5, len(y)) + 0.4 * y - 0.3 * (k == 1), 0.05, 0.95), 1)
        for k, y in enumerate(ys)
    ]
    probs = [np.stack([1 - s, s], axis=1) for s in scores]
    hists = [site_summary(y, p)["score_hist"][-1] for y, p in zip(ys, probs, strict=True)]  # class 1's rows
    from_predictions = pooled_auc_parts(ys, probs)
    assert pooled_auc_parts_from_histograms(hists) == pytest.approx(from_predictions, abs=1e-6)
    assert _pairs_by_hand(ys, scores)[0] == pytest.approx(from_predictions["within_sites"], abs=1e-6)

    # noised counts (a dp_histogram release), some below zero: the parts of the clipped counts' AUC
    noised = [h + rng.normal(0, 2.0, h.shape) for h in hists]
    parts = pooled_auc_parts_from_histograms(noised)
    assert 0 <= parts["within_sites"] <= 1 and 0 <= parts["across_sites"] <= 1
    pooled = auc_from_histogram(sum(np.clip(h, 0, None) for h in noised)[None])
    share = parts["across_share"]
    assert parts["within_sites"] * (1 - share) + parts["across_sites"] * share == pytest.approx(
        pooled, abs=1e-4
    )


def test_pooled_auc_parts_undefined_for_more_classes_or_one_site_with_both_classes():
    y = np.array([0, 1, 2, 1])
    assert pooled_auc_parts([y], [np.full((4, 3), 1 / 3)]) is None
    # every positive at one site, every negative at the other: no pair within a site
    assert pooled_auc_parts([np.ones(3, int), np.zeros(3, int)], [np.full((3, 2), 0.5)] * 2) is None
    only_positives, only_negatives = np.array([[0, 0], [3, 1]]), np.array([[2, 2], [0, 0]])
    assert pooled_auc_parts_from_histograms([only_positives, only_negatives]) is None
