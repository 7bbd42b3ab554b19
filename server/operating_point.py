"""The operating point of a binary model: a threshold chosen on the sites' validation releases.

After the last round the coordinator asks every site to evaluate the final model on its validation
split (a release like any evaluation: the site's policy decides it and charges it), pools the
releases of one kind (server.releases), and picks the threshold among that binning's edges by the
study's rule (common.schema.OperatingPointConfig). The test releases of the last round then give each
site's sensitivity and specificity at that threshold: the test data never chose it.
"""

from __future__ import annotations

import numpy as np

from common.metrics import histogram_edges
from common.schema import OperatingPointConfig


def edges_of(pool: dict) -> np.ndarray:
    kind, bins = pool["key"]
    return histogram_edges(kind, bins)


def class1_counts(pool: dict) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per score bin of class 1, noise clipped at 0."""
    hist = pool["score_hist"]
    block = hist[0] if pool["key"][0] == "dp_histogram" else hist[1]
    return np.clip(block[1], 0, None), np.clip(block[0], 0, None)


def rates(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity when 'positive' means a score at or above edge j, for every j."""
    above_pos = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    below_neg = np.concatenate([[0.0], np.cumsum(neg)])
    return above_pos / max(pos.sum(), 1e-12), below_neg / max(neg.sum(), 1e-12)


def choose(pools: list[dict], rule: OperatingPointConfig) -> dict | None:
    """The threshold by `rule` over the pooled validation releases `pools` (one binning), or None."""
    if rule.rule == "none" or not pools:
        return None
    pos = sum(class1_counts(p)[0] for p in pools)
    neg = sum(class1_counts(p)[1] for p in pools)
    if pos.sum() < 1 or neg.sum() < 1:
        return None
    sens, spec = rates(pos, neg)
    if rule.rule == "youden":
        j = int(np.argmax(sens + spec))
    elif rule.rule == "sensitivity":
        ok = np.flatnonzero(sens >= rule.target)
        j = int(ok[-1]) if len(ok) else 0
    else:
        ok = np.flatnonzero(spec >= rule.target)
        j = int(ok[0]) if len(ok) else len(sens) - 1
    edges = edges_of(pools[0])
    described = rule.rule if rule.rule == "youden" else f"{rule.rule} >= {rule.target:g}"
    return {"class": 1, "threshold": float(edges[j]), "rule": described, "chosen_on": "the sites' validation releases",
            "validation": {"sensitivity": float(sens[j]), "specificity": float(spec[j])}}  # fmt: skip


def at_threshold(pool: dict, threshold: float) -> dict[str, float | None]:
    """A site's sensitivity and specificity at `threshold` from its (test) release, at the nearest edge."""
    pos, neg = class1_counts(pool)
    sens, spec = rates(pos, neg)
    j = int(np.argmin(np.abs(edges_of(pool) - threshold)))
    return {
        "sensitivity": float(sens[j]) if pos.sum() >= 1 else None,
        "specificity": float(spec[j]) if neg.sum() >= 1 else None,
    }


def operating_point(
    val_releases: dict[str, dict], test_releases: dict[str, dict], rule: OperatingPointConfig
) -> dict | None:
    """results.json's `operating_point`: the threshold from the pooled validation releases (the binning
    with the most validation images), and each site's test sensitivity and specificity at it."""
    groups: dict[tuple, list[str]] = {}
    for site, r in val_releases.items():
        if r["pool"] is not None:
            groups.setdefault(r["pool"]["key"], []).append(site)
    if not groups:
        return None
    key = max(groups, key=lambda g: sum(val_releases[s]["summary"]["n_test"] for s in groups[g]))
    chosen = choose([val_releases[s]["pool"] for s in groups[key]], rule)
    if chosen is None:
        return None
    chosen["validation"]["sites"] = sorted(groups[key])
    chosen["test"] = {
        s: at_threshold(r["pool"], chosen["threshold"]) for s, r in sorted(test_releases.items()) if r["pool"]
    }
    return chosen
