"""From what each site released of an evaluation to per-site and pooled metrics, with the noise stated.

A site's evaluation reply is its policy's release (client.evaluation): `exact` aggregates (metrics,
confusion matrix, fine histograms), a `summary` (metrics only), or a `dp_histogram` (noised
logit-binned histograms, and the noised confusion matrix with more than two classes). The coordinator
computes a dp site's metrics from its noised counts, and pools the sites that released the same kind
of aggregates (the kind that covers the most test images); a site left out of the pool is named. For
noised releases it states the noise's effect: the standard deviation of each AUC over fresh draws of
the same noise around the released counts (a parametric bootstrap). Binary releases also get a 95%
AUC interval from their counts (Hanley and McNeil's, widened by that noise and by the pairs tied
in one bin) and the expected
calibration error of their score histograms (common.uncertainty); a binary pooled AUC is split by
its pairs, within one site and across two (`auc_parts`, common.metrics).
"""

from __future__ import annotations

import numpy as np

from common.keys import Met
from common.metrics import (
    HIST_BINS,
    binary_confusion,
    histogram_edges,
    pooled_auc_parts_from_histograms,
    pooled_summary,
    public_metrics,
    summary_from_counts,
)
from common.privacy import reported
from common.seg_metrics import SUM_KEYS, segmentation_summary
from common.uncertainty import auc_interval, calibration_from_histogram

NOISE_DRAWS = 200  # draws of the parametric bootstrap of a noised release's AUC
NAMED = (
    ("auc", Met.AUC),
    ("accuracy", Met.ACCURACY),
    ("sensitivity", Met.SENSITIVITY),
    ("specificity", Met.SPECIFICITY),
    ("balanced_accuracy", Met.BALANCED_ACCURACY),
)


def _segmentation_release(kind: str, m) -> dict:
    """A segmentation reply (client.evaluation.segmentation_release): its Dice and HD95 sums, with
    a dp_histogram's HD95 scaled back from its cap; they pool by adding."""
    sums = {k: np.asarray(m[key], dtype=np.float64) for k, key in SUM_KEYS.items()}
    noise = 0.0
    if kind == "dp_histogram":
        sums["hd95_sum"] = sums["hd95_sum"] * float(m[Met.EVAL_HD_CAP])
        noise = float(m[Met.EVAL_NOISE])
    n_test = int(m[Met.N_TEST]) if Met.N_TEST in m else None
    summary = segmentation_summary(sums, n_test)
    return {"kind": kind, "summary": summary, "pool": {"key": (kind, "segmentation"), "sums": sums},
            "noise": noise, "task": "segmentation"}  # fmt: skip


def site_release(kind: str, m, n_classes: int) -> dict:
    """A site's evaluation reply as {kind, summary (common.metrics), pool (aggregates or None), noise}."""
    if Met.DICE_SUM in m:
        return _segmentation_release(kind, m)
    if kind == "dp_histogram":
        bins = int(m[Met.EVAL_BINS])
        k = 1 if n_classes == 2 else n_classes
        hist = np.asarray(m[Met.SCORE_HIST], dtype=np.float64).reshape(k, 2, bins)
        confusion = (
            binary_confusion(hist)
            if n_classes == 2
            else np.asarray(m[Met.CONFUSION], dtype=np.float64).reshape(n_classes, n_classes)
        )
        summary = summary_from_counts(hist, confusion)
        pool = {"key": ("dp_histogram", bins), "score_hist": hist, "confusion": confusion}
        return {"kind": kind, "summary": summary, "pool": pool, "noise": float(m[Met.EVAL_NOISE])}
    summary = {"n_test": int(m[Met.N_TEST]), **{k: _undefined(m[key]) for k, key in NAMED}}
    if kind == "summary":
        return {"kind": kind, "summary": summary, "pool": None, "noise": 0.0}
    pool = {
        "key": ("exact", HIST_BINS),
        "confusion": np.asarray(m[Met.CONFUSION]).reshape(n_classes, n_classes),
        "score_hist": np.asarray(m[Met.SCORE_HIST]).reshape(n_classes, 2, HIST_BINS),
    }
    return {"kind": "exact", "summary": summary, "pool": pool, "noise": 0.0}


def site_metrics(release: dict, m) -> dict:
    """results.json's metrics of one site's release."""
    if release.get("task") == "segmentation":
        return _segmentation_metrics(release["summary"], release["kind"], m)
    out = public_metrics({k: (np.nan if v is None else v) for k, v in release["summary"].items()})
    out["release"] = release["kind"]
    if Met.PRIVACY_UNIT in m:
        out["privacy_unit"] = "patient" if m[Met.PRIVACY_UNIT] else "image"
    if release["kind"] == "dp_histogram":
        out["evaluation_epsilon"] = reported(float(m[Met.EVAL_EPSILON]))
        out["noise_sd"] = {"auc": _auc_noise_sd([release])}
    auc = release["summary"]["auc"]
    out |= _interval_and_calibration(release["pool"], auc, out.get("noise_sd", {}).get("auc") or 0.0)
    return out


def _interval_and_calibration(pool: dict | None, auc: float | None, noise_sd: float) -> dict:
    """A binary release's AUC 95% interval and expected calibration error, from its histograms."""
    if pool is None or pool["score_hist"].shape[0] > 2:
        return {}  # a summary, or more than two classes
    hist = pool["score_hist"][-1]  # class 1's: exact keeps both classes' rows, dp_histogram only class 1's
    kind, bins = pool["key"]
    edges = histogram_edges(kind, bins)
    neg, pos = np.clip(hist[0], 0, None), np.clip(hist[1], 0, None)  # noised counts below zero: none
    pairs = pos.sum() * neg.sum()
    ties = float((pos * neg).sum() / pairs) if pairs > 0 else 0.0
    auc_ci = None if auc is None else auc_interval(auc, pos.sum(), neg.sum(), noise_sd=noise_sd, ties=ties)
    return {"auc_ci": auc_ci, "ece": calibration_from_histogram(neg, pos, edges)}


def _segmentation_metrics(summary: dict, kind: str, m=None) -> dict:
    out = {k: (None if v is None else round(float(v), 6)) for k, v in summary.items()} | {"release": kind}
    out["n_test"] = int(summary["n_test"])
    if m is not None and Met.PRIVACY_UNIT in m:
        out["privacy_unit"] = "patient" if m[Met.PRIVACY_UNIT] else "image"
    if m is not None and kind == "dp_histogram":
        out["evaluation_epsilon"] = reported(float(m[Met.EVAL_EPSILON]))
    return out


def _pooled_segmentation(releases: dict[str, dict]) -> dict:
    """Dice and HD95 over every counted image of every site (the sums of one kind of release)."""
    kinds: dict[str, list[str]] = {}
    for site, r in releases.items():
        kinds.setdefault(r["kind"], []).append(site)
    kind = max(kinds, key=lambda k: sum(releases[s]["summary"]["n_test"] for s in kinds[k]))
    members = sorted(kinds[kind])
    sums = {k: sum(releases[s]["pool"]["sums"][k] for s in members) for k in SUM_KEYS}
    n_test = sum(releases[s]["summary"]["n_test"] for s in members)
    out = _segmentation_metrics(segmentation_summary(sums, n_test), kind) | {"sites": members}
    left_out = sorted(set(releases) - set(members))
    if left_out:
        out["left_out"] = left_out
    return out


def pooled_metrics(releases: dict[str, dict]) -> dict:
    """Metrics over the sites whose releases can be added up (the kind with the most test images)."""
    if releases and all(r.get("task") == "segmentation" for r in releases.values()):
        return _pooled_segmentation(releases)
    groups: dict[tuple, list[str]] = {}
    for site, r in releases.items():
        if r["pool"] is not None:
            groups.setdefault(r["pool"]["key"], []).append(site)
    if not groups:
        return {}
    key = max(groups, key=lambda g: sum(releases[s]["summary"]["n_test"] for s in groups[g]))
    members = [releases[s] for s in groups[key]]
    summary = pooled_summary([r["pool"] for r in members])
    out = public_metrics(summary)
    out["release"] = key[0]
    out["sites"] = sorted(groups[key])
    left_out = sorted(set(releases) - set(groups[key]))
    if left_out:
        out["left_out"] = left_out  # their releases cannot be added to these (summary only, or other bins)
    if key[0] == "dp_histogram":
        out["noise_sd"] = {"auc": _auc_noise_sd(members)}
    pooled = {"key": key, "score_hist": sum(np.asarray(r["pool"]["score_hist"], np.float64) for r in members)}
    out |= _interval_and_calibration(pooled, out["auc"], (out.get("noise_sd") or {}).get("auc") or 0.0)
    if pooled["score_hist"].shape[0] <= 2:  # binary: class 1's rows (exact keeps both classes', dp one)
        parts = pooled_auc_parts_from_histograms([r["pool"]["score_hist"][-1] for r in members])
        if parts is not None:
            out["auc_parts"] = parts  # where the pooled AUC's pairs come from, within a site or across two
    return out


def _auc_noise_sd(members: list[dict]) -> float | None:
    """The standard deviation of the (pooled) AUC over fresh draws of the releases' noise."""
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(NOISE_DRAWS):
        pools = [
            {
                "score_hist": r["pool"]["score_hist"]
                + rng.normal(0.0, r["noise"], r["pool"]["score_hist"].shape),
                "confusion": r["pool"]["confusion"],
            }
            for r in members
        ]
        auc = pooled_summary(pools)["auc"]
        if np.isfinite(auc):
            draws.append(auc)
    return round(float(np.std(draws)), 6) if len(draws) > 1 else None


def _undefined(value) -> float | None:
    return None if float(value) < 0 else float(value)  # -1 marks "undefined" in a MetricRecord
