"""A hospital's own privacy limits, and the check that refuses a round that would break them.

The site policy comes from the site's config, never from the coordinator: the coordinator asks
(`common.privacy.PrivacyRequest`), the site decides. Both checks return a human-readable reason
to refuse, or None to go ahead, so the caller can send the reason back instead of an update.

    policy = SitePolicy(max_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.8, max_grad_norm=1.0)
    reason = policy.check(request) or policy.would_exceed_budget(
        accountant.history(), noise_multiplier=..., sample_rate=..., steps=...
    )
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.privacy import HistoryItem, PrivacyRequest, rdp_epsilon


class SitePolicyError(ValueError):
    """The site's privacy policy (from its site config) is missing a key or out of range."""


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """The strongest privacy loss a site accepts over the whole study, and the weakest settings."""

    max_epsilon: float  # total epsilon this site's data may spend, all rounds together
    delta: float  # the site's delta: epsilon is counted at it; requests may not exceed it
    min_noise_multiplier: float  # refuse rounds asking for less noise than this
    max_grad_norm: float  # refuse rounds asking for a larger clipping bound than this

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise SitePolicyError(f"max_epsilon must be > 0, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise SitePolicyError(f"delta must be in (0, 1), got {self.delta}")
        if not self.min_noise_multiplier >= 0:
            raise SitePolicyError(f"min_noise_multiplier must be >= 0, got {self.min_noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise SitePolicyError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")

    def check(self, request: PrivacyRequest) -> str | None:
        """Why this site refuses `request`, or None when it is at least as strict as the policy."""
        if request.noise_multiplier < self.min_noise_multiplier:
            return (
                f"noise multiplier {request.noise_multiplier:g} requested is below this site's "
                f"minimum {self.min_noise_multiplier:g}"
            )
        if request.max_grad_norm > self.max_grad_norm:
            return (
                f"clipping norm (max_grad_norm) {request.max_grad_norm:g} requested is above this "
                f"site's maximum {self.max_grad_norm:g}"
            )
        if request.delta > self.delta:
            return f"delta {request.delta:g} requested is above this site's delta {self.delta:g}"
        return None

    def projected_epsilon(
        self,
        history: Sequence[HistoryItem],
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Epsilon (at the site's delta) after `history` plus one more round; `history` is kept."""
        planned = [*history, (float(noise_multiplier), float(sample_rate), int(steps))]
        return rdp_epsilon(planned, delta=self.delta)

    def would_exceed_budget(
        self,
        history: Sequence[HistoryItem],
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> str | None:
        """Why the planned round would take the site past `max_epsilon`, or None if it fits.

        `history` is what the site has spent so far (`SiteAccountant.history()`); the planned round
        is `steps` optimizer steps at `noise_multiplier` and `sample_rate`. Nothing is recorded.
        """
        spent = rdp_epsilon(history, delta=self.delta)
        after = self.projected_epsilon(
            history, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        if after > self.max_epsilon:
            return (
                f"privacy budget: epsilon would reach {after:.3f} after this round "
                f"({steps} steps at noise {noise_multiplier:g}, sample rate {sample_rate:g}), "
                f"above this site's max_epsilon {self.max_epsilon:g} at delta {self.delta:g} "
                f"(spent so far: {spent:.3f})"
            )
        return None
