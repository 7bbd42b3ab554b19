"""What a site releases when it evaluates a model: its policy's choice, protected by default.

An evaluation is summed up in aggregates of the site's test predictions (common.metrics). A coordinator
that holds one test image can read its label from exact aggregates (an image alone in its score bin),
and it can send any weights it likes to be evaluated. So a site's policy (`privacy.evaluation`) says
what leaves:

  dp_histogram  per class, the scores of its positives and of the rest in `bins` logit-spaced bins,
                and with more than two classes the confusion matrix; every count with Gaussian noise of
                std `noise` x the release's L2 sensitivity (one test image moves one count per class
                histogram and one confusion cell). Each release is one Gaussian mechanism, written to
                the ledger as an `evaluation` line before the reply leaves, against the test images'
                own budget `evaluation.max_epsilon`; past it the site refuses to evaluate. The
                coordinator computes the metrics from the noised counts.
  summary       the site's metrics alone, exact (not private against a coordinator that crafts the
                models it asks about; a site that chooses it says so in its config).
  exact         the exact aggregates (2000-bin histograms, confusion matrix, exact AUC): the sites a
                simulation makes from a study config, and any site that chooses it.

The noise comes from the round's secret randomness (client.randomness), like training's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from client.ledger import EVALUATION_KINDS, SiteAccountant
from client.randomness import RoundRandomness
from common.keys import Met
from common.metrics import binned_histogram, logit_edges, site_summary
from common.privacy import HistoryItem, rdp_epsilon
from common.schema import EvaluationPolicyConfig, SiteConfig
from common.seg_metrics import SUM_KEYS, per_image_scores, sums_from_scores


@dataclass(frozen=True)
class Release:
    """One evaluation's reply: its metrics, and the ledger step it spends (None: nothing is charged)."""

    kind: str  # dp_histogram | summary | exact
    metrics: dict
    spends: HistoryItem | None = None


def sensitivity(n_classes: int) -> float:
    """L2 change of the dp_histogram release when one test image is added or removed."""
    return 1.0 if n_classes == 2 else math.sqrt(n_classes + 1)


def planned_spend(policy: EvaluationPolicyConfig) -> HistoryItem | None:
    """The ledger step one evaluation released under `policy` spends (None: it is not charged; only
    the releases that are not private, `exact` and `summary`). It depends on the policy alone, so the
    budget is checked before any image is looked at."""
    return None if policy.release in ("exact", "summary") else (float(policy.noise), 1.0, 1)


def release(
    labels: np.ndarray,
    probs: np.ndarray,
    policy: EvaluationPolicyConfig,
    noise: torch.Generator,
    *,
    per_unit: int = 1,
) -> Release:
    """What a site with `policy` releases of an evaluation with test `labels` and predicted `probs`.
    `per_unit`: how many images one unit of privacy may have among them (a patient's, at most
    `max_images_per_patient`; 1 for image-level privacy): the sensitivity grows with it."""
    if policy.release == "exact":
        s = site_summary(labels, probs)
        metrics = {
            Met.N_TEST: s["n_test"],
            **{key: _num(s[name]) for name, key in _NAMED},
            Met.CONFUSION: s["confusion"].reshape(-1).tolist(),
            Met.SCORE_HIST: s["score_hist"].reshape(-1).tolist(),
        }
        return Release("exact", metrics)
    if policy.release == "summary":
        s = site_summary(labels, probs)
        return Release("summary", {Met.N_TEST: s["n_test"], **{key: _num(s[name]) for name, key in _NAMED}})
    n_classes = probs.shape[1]
    std = policy.noise * sensitivity(n_classes) * per_unit
    hist = binned_histogram(labels, probs, logit_edges(policy.bins))
    metrics = {Met.SCORE_HIST: _noised(hist, std, noise), Met.EVAL_NOISE: std, Met.EVAL_BINS: policy.bins}
    if n_classes > 2:
        confusion = np.zeros((n_classes, n_classes))
        np.add.at(confusion, (labels, probs.argmax(axis=1)), 1)
        metrics[Met.CONFUSION] = _noised(confusion, std, noise)
    return Release("dp_histogram", metrics, spends=planned_spend(policy))


def segmentation_release(
    true: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    policy: EvaluationPolicyConfig,
    noise: torch.Generator,
    *,
    per_unit: int = 1,
) -> Release:
    """What a site releases of a segmentation evaluation (true and predicted label maps): per
    foreground class the sums and counts of Dice and HD95 (common.seg_metrics). `exact` and `summary`
    send them as they are (a summary is no safer here: the sums are the means); `dp_histogram` clips
    each image's HD95 to the image's diagonal (its largest possible value), divides by it, and adds
    Gaussian noise to all four sums of every class: one image moves each by at most 1, so the L2
    sensitivity is 2 x sqrt(classes - 1), times `per_unit` images per unit of privacy."""
    dice, hd95 = per_image_scores(true, pred, num_classes)
    if planned_spend(policy) is None:  # exact or summary: the sums as they are
        sums = sums_from_scores(dice, hd95)
        metrics = {SUM_KEYS[k]: v.tolist() for k, v in sums.items()} | {Met.N_TEST: int(len(true))}
        return Release("exact", metrics)
    cap = float(np.sqrt(np.sum(np.square(true.shape[1:]))))
    sums = sums_from_scores(dice, np.minimum(hd95, cap) / cap)
    std = policy.noise * 2.0 * math.sqrt(num_classes - 1) * per_unit
    metrics = {SUM_KEYS[k]: _noised(v, std, noise) for k, v in sums.items()}
    metrics |= {Met.EVAL_NOISE: std, Met.EVAL_HD_CAP: cap}
    return Release("dp_histogram", metrics, spends=planned_spend(policy))


def refusal(site: SiteConfig, spends: HistoryItem | None) -> str | None:
    """Why the site may not release an evaluation that `spends` this (no ledger, or its evaluation
    budget), or None."""
    if spends is None:
        return None
    if not site.state_dir:
        return f"site '{site.site}' has no state_dir for the ledger its protected evaluations are charged to"
    policy, delta = site.privacy.evaluation, site.privacy.delta
    history = SiteAccountant(site.state_dir).history(EVALUATION_KINDS)
    after = rdp_epsilon([*history, spends], delta=delta)
    if after > policy.max_epsilon:
        return (
            f"site '{site.site}' refuses to evaluate: its evaluation epsilon would reach {after:.3f}, above "
            f"privacy.evaluation.max_epsilon {policy.max_epsilon:g} (spent: {rdp_epsilon(history, delta=delta):.3f})"
        )
    return None


def record(site: SiteConfig, release_: Release, *, study: str, round_: int, repeatable: bool) -> float:
    """Write the release's evaluation line (before the reply leaves); the epsilon spent on the site's
    test images (infinite once any release of them was not private)."""
    nm, q, steps = release_.spends
    accountant = SiteAccountant(site.state_dir)
    accountant.record_round(
        round=round_, steps=steps, sample_rate=q, noise_multiplier=nm, max_grad_norm=1.0,
        delta=site.privacy.delta, study=study, kind="evaluation", repeatable=repeatable,
    )  # fmt: skip
    return accountant.spent(site.privacy.delta, EVALUATION_KINDS)


def patient_subset(patients: list[str], cap: int) -> np.ndarray:
    """Indices of at most `cap` test images per patient (each patient's first ones)."""
    seen: dict[str, int] = {}
    keep = []
    for i, patient in enumerate(patients):
        seen[patient] = seen.get(patient, 0) + 1
        if seen[patient] <= cap:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def randomness(site: SiteConfig, seed: int, round_: int) -> RoundRandomness:
    """The evaluation's noise generator: secret, unless the site config asks for repeatable noise."""
    if site.privacy.repeatable_noise:
        return RoundRandomness.repeatable(seed, round_)
    return RoundRandomness.secret()


_NAMED = (
    ("auc", Met.AUC),
    ("accuracy", Met.ACCURACY),
    ("sensitivity", Met.SENSITIVITY),
    ("specificity", Met.SPECIFICITY),
    ("balanced_accuracy", Met.BALANCED_ACCURACY),
)


def _noised(counts: np.ndarray, std: float, generator: torch.Generator) -> list[float]:
    noise = torch.randn(counts.size, generator=generator, dtype=torch.float64).numpy() * std
    return (counts.reshape(-1) + noise).tolist()


def _num(x: float) -> float:
    return -1.0 if np.isnan(x) else float(x)  # MetricRecord has no NaN; -1 marks "undefined"
