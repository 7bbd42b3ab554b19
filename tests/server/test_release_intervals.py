"""The per-site AUC interval and calibration error the coordinator computes from what a site released
(the sites' real release code): the ECE of an exact release is the ECE of the predictions themselves,
and the intervals cover the true AUC about 95% of the time, with the release's noise or without it."""

from __future__ import annotations

import numpy as np
import torch

from client.evaluation import release
from common.keys import Met
from common.metrics import exact_auc
from common.schema import EvaluationPolicyConfig
from common.uncertainty import calibration
from server.releases import site_metrics, site_release


def _scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)))
    return y, np.stack([1 - p1, p1], axis=1)


def _metrics(kind: str, y, probs, seed: int) -> dict:
    got = release(
        y,
        probs,
        EvaluationPolicyConfig(release=kind, bins=16, noise=2.0),
        torch.Generator().manual_seed(seed),
    )
    metrics = {**got.metrics, Met.EVAL_EPSILON: 2.17}  # the site adds what its ledger charged
    return site_metrics(site_release(kind, metrics, 2), metrics)


def test_the_ece_of_an_exact_release_is_that_of_its_predictions():
    y, probs = _scores(np.random.default_rng(0), 300)
    got = _metrics("exact", y, probs, 0)
    assert (
        abs(got["ece"] - calibration(y, probs)["ece"]) < 0.002 and got["ece"] > 0.05
    )  # these are not calibrated


def test_the_auc_intervals_cover_the_true_auc_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    truth = exact_auc(*_scores(rng, 200_000))  # the model's AUC on the whole population
    for kind in ("exact", "dp_histogram"):
        covered = []
        for seed in range(200):
            y, probs = _scores(rng, 120)
            low, high = _metrics(kind, y, probs, seed)["auc_ci"]
            covered.append(low <= truth <= high)
        print(kind, np.mean(covered))
        assert 0.90 <= np.mean(covered) <= 0.995, (kind, np.mean(covered))
