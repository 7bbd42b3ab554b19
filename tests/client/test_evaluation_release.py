"""What an evaluation releases, attacked: a coordinator that holds one test image tries to read its
label from a site's evaluation release. From exact aggregates it reads every label; from the default
protected release it succeeds no more often than the release's epsilon allows, measured over many
draws, and about as often as the noise's level says. The coordinator's pooled metrics from noised
releases state their noise, and that statement is right."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from client.evaluation import release, sensitivity
from client.randomness import RoundRandomness
from common.keys import Met
from common.metrics import HIST_BINS, histogram_edges
from common.privacy import rdp_epsilon
from common.schema import EvaluationPolicyConfig
from server.releases import pooled_metrics, site_release

DELTA = 1e-5


def _test_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a model's probabilities for a site's test set (about 0.9 AUC)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-rng.normal(2.0 * y - 1.0, 1.3)))
    return y, np.stack([1 - p1, p1], axis=1)


def _bin(score: float, edges: np.ndarray) -> int:
    return int(np.clip(np.searchsorted(edges, score, side="right") - 1, 0, len(edges) - 2))


def _counts(metrics: dict, bins: int) -> np.ndarray:
    """The released class-1 histogram as 2 x B (row 0: the rest, row 1: positives)."""
    hist = np.asarray(metrics[Met.SCORE_HIST], dtype=np.float64)
    return hist.reshape(-1, 2, bins)[-1]  # binary exact releases hold classes 0 and 1: class 1 is last


def _attack(policy: EvaluationPolicyConfig, draws: int) -> float:
    """The strongest attack: it knows every other test image's score and label, so it knows their
    counts exactly, and reads the target's from what is left in the target's bin."""
    y, probs = _test_set(150, seed=1)
    exact = policy.release == "exact"
    bins = HIST_BINS if exact else policy.bins
    edges = histogram_edges(policy.release, bins)
    correct = total = 0
    for _ in range(draws):
        target = np.random.default_rng().integers(len(y))
        noise = RoundRandomness.secret().noise
        counts = _counts(release(y, probs, policy, noise).metrics, bins)
        others = np.ones(len(y), bool)
        others[target] = False
        known = np.zeros((2, bins))
        for label, p in zip(y[others], probs[others, 1], strict=True):
            known[label, _bin(p, edges)] += 1
        b = _bin(probs[target, 1], edges)
        left = counts[:, b] - known[:, b]
        guess = int(left[1] > left[0])
        correct += guess == y[target]
        total += 1
    return correct / total


def test_exact_aggregates_give_away_every_label():
    assert _attack(EvaluationPolicyConfig(release="exact"), draws=200) == 1.0


def test_the_protected_release_allows_no_more_than_its_epsilon_and_its_noise():
    policy = EvaluationPolicyConfig()  # the default: dp_histogram, 16 bins, noise 2
    draws = 3000

    success = _attack(policy, draws)

    # a label flip moves one count from one row to the other: an L2 step of sqrt(2)
    eps = rdp_epsilon([(policy.noise * sensitivity(2) / math.sqrt(2), 1.0, 1)], delta=DELTA)
    dp_bound = (math.exp(eps) + DELTA) / (1 + math.exp(eps))
    optimum = norm.cdf(1 / (math.sqrt(2) * policy.noise))  # the best test against this noise
    slack = 3 * math.sqrt(optimum * (1 - optimum) / draws)
    assert success <= dp_bound, (
        f"attack accuracy {success:.3f} above what epsilon {eps:.2f} allows ({dp_bound:.3f})"
    )
    assert abs(success - optimum) < slack, f"attack accuracy {success:.3f}, the noise allows {optimum:.3f}"


def test_pooled_metrics_from_noised_releases_state_their_noise_rightly():
    policy = EvaluationPolicyConfig(noise=1.0)
    sites = {name: _test_set(n, seed) for name, n, seed in (("a", 120, 2), ("b", 60, 3), ("c", 400, 4))}

    def pooled() -> dict:
        releases = {}
        for name, (y, probs) in sites.items():
            out = release(y, probs, policy, RoundRandomness.secret().noise)
            releases[name] = site_release(out.kind, out.metrics, 2)
        return pooled_metrics(releases)

    runs = [pooled() for _ in range(120)]
    stated = np.median([r["noise_sd"]["auc"] for r in runs])
    observed = np.std([r["auc"] for r in runs])

    assert runs[0]["release"] == "dp_histogram" and runs[0]["sites"] == ["a", "b", "c"]
    assert 0.6 < stated / observed < 1.6, f"stated noise sd {stated:.4f}, observed {observed:.4f}"
    assert abs(np.median([r["n_test"] for r in runs]) - 580) < 5
