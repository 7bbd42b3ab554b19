"""The operating point is chosen on validation releases only, and meets its target there."""

from __future__ import annotations

import numpy as np
import torch

from client.evaluation import release
from common.schema import EvaluationPolicyConfig, OperatingPointConfig
from server.operating_point import operating_point
from server.releases import site_release


def _site_releases(kind: str, seed: int, n: int = 400) -> dict:
    """Each of two sites' release (the sites' real release code) of scores from a good model."""
    rng = np.random.default_rng(seed)
    out = {}
    for site in ("hospital-a", "hospital-b"):
        y = rng.integers(0, 2, n)
        logit = rng.normal(np.where(y == 1, 2.0, -2.0), 1.5)
        p1 = 1 / (1 + np.exp(-logit))
        probs = np.stack([1 - p1, p1], axis=1)
        policy = EvaluationPolicyConfig(release=kind, bins=32, noise=0.5)
        got = release(y, probs, policy, torch.Generator().manual_seed(seed))
        out[site] = (site_release(kind, got.metrics, 2), y, p1)
    return out


def test_the_threshold_meets_its_target_sensitivity_on_validation_and_ignores_test_data():
    rule = OperatingPointConfig(rule="sensitivity", target=0.95)
    for kind in ("exact", "dp_histogram"):
        val = _site_releases(kind, seed=1)
        test = _site_releases(kind, seed=2)
        chosen = operating_point(
            {s: r for s, (r, _, _) in val.items()}, {s: r for s, (r, _, _) in test.items()}, rule
        )
        # on the validation images themselves (exactly, not from the releases): sensitivity at the target
        y = np.concatenate([v[1] for v in val.values()])
        p1 = np.concatenate([v[2] for v in val.values()])
        exact_sens = np.mean(p1[y == 1] >= chosen["threshold"])
        assert exact_sens >= 0.95 - (0.02 if kind == "dp_histogram" else 0.0), (kind, exact_sens)
        assert chosen["validation"]["sensitivity"] >= 0.95
        other_test = _site_releases(kind, seed=3)  # different test data: the same threshold
        again = operating_point(
            {s: r for s, (r, _, _) in val.items()}, {s: r for s, (r, _, _) in other_test.items()}, rule
        )
        assert again["threshold"] == chosen["threshold"]
        assert set(chosen["test"]) == {"hospital-a", "hospital-b"}


def test_youden_balances_sensitivity_and_specificity():
    val = _site_releases("exact", seed=4)
    chosen = operating_point({s: r for s, (r, _, _) in val.items()}, {}, OperatingPointConfig(rule="youden"))
    assert 0.3 < chosen["threshold"] < 0.7  # symmetric classes: near the middle
    v = chosen["validation"]
    assert v["sensitivity"] > 0.85 and v["specificity"] > 0.85, (
        f"well separated symmetric classes: Youden's point should keep both high, got {v}"
    )
