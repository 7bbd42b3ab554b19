"""The promotion verdict of `fedward compare` (server.compare) on validations' per-site releases: a
model worse at one site is not promoted, whatever it gains elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.evaluation import release
from common.config import ConfigError
from common.schema import EvaluationPolicyConfig
from server.compare import compare
from server.releases import site_metrics, site_release


def _release(labels: np.ndarray, scores: np.ndarray) -> dict:
    """The site's exact release of these predictions (client.evaluation), as the coordinator reads it."""
    probs = np.stack([1 - scores, scores], axis=1)
    out = release(labels, probs, EvaluationPolicyConfig(release="exact"), torch.Generator())
    return site_metrics(site_release(out.kind, out.metrics, 2), out.metrics)


def _entry(label: str, sites: dict[str, float], rng) -> dict:
    """A validated package whose scores separate the classes by `sites[s]` at each site."""
    out = {}
    for s, separation in sites.items():
        labels = (np.arange(300) % 2).astype(np.int64)
        scores = 1 / (1 + np.exp(-(separation * (labels - 0.5) * 2 + rng.normal(0, 1, 300))))
        out[s] = _release(labels, scores)
    pooled = out[next(iter(out))]
    return {
        "label": label,
        "package": f"/{label}",
        "sha256": label * 8,
        "sites": out,
        "pooled": pooled,
        "failed": {},
    }


DOC = {"metric": "auc"}


def test_a_model_worse_at_one_site_is_not_promoted_whatever_it_gains_elsewhere():
    rng = np.random.default_rng(0)
    old = _entry("old", {"a": 1.0, "b": 1.0, "c": 1.0}, rng)
    new = _entry("new", {"a": 2.5, "b": 2.5, "c": 0.1}, rng)  # much better at a and b, near chance at c
    result = compare(DOC, DOC, old, new)
    assert result["sites"]["a"]["verdict"] == result["sites"]["b"]["verdict"] == "better"
    assert result["sites"]["c"]["verdict"] == "worse" and result["sites"]["c"]["ci"][1] < 0
    assert not result["promote"] and result["reasons"][0].startswith("c: NEW is significantly worse")


def test_a_model_better_somewhere_and_worse_nowhere_is_promoted_and_one_not_evaluated_everywhere_is_not():
    rng = np.random.default_rng(1)
    old = _entry("old", {"a": 1.0, "b": 1.0}, rng)
    new = _entry("new", {"a": 2.5, "b": 1.0}, rng)
    assert compare(DOC, DOC, old, new)["promote"]
    new["failed"] = {"b": "refused: budget"}
    del new["sites"]["b"]
    result = compare(DOC, DOC, old, new)
    assert not result["promote"] and any(
        r.startswith("b: NEW was not evaluated here") for r in result["reasons"]
    )


def test_segmentation_validations_cannot_be_compared_and_say_why():
    with pytest.raises(ConfigError, match="Dice sums without intervals"):
        compare({"metric": "dice"}, {"metric": "dice"}, {}, {})
