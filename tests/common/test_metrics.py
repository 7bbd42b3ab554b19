"""Metrics agree with scikit-learn on fixed inputs; pooled metrics from aggregates match pooling images."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    recall_score,
    roc_auc_score,
)

from common.metrics import auc_from_histogram, pooled_summary, public_metrics, site_summary


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
