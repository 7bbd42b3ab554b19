"""A hospital's own privacy rules, and the checks that refuse a request that would break them.

The site policy comes from the site's config (its `privacy` section), never from the coordinator: the
coordinator asks (the round's ConfigRecord, common.privacy), the site decides. Every check returns the
reason to refuse, naming the policy field and what the site allows, or None to go ahead, so the
caller can send the reason back instead of an update.

    policy = SitePolicy.of(site_config)
    reason = policy.check_mode(dp_enabled) or policy.check(request) or policy.would_exceed_budget(
        accountant.history(), planned=[(noise, sample_rate, steps)]
    )
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from common.privacy import HistoryItem, PrivacyRequest, rdp_epsilon
from common.schema import SiteConfig


class SitePolicyError(ValueError):
    """The site's privacy policy (from its site config) is out of range."""


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """The strongest privacy loss a site accepts over every study, and the weakest settings."""

    required: bool = True  # train only with differential privacy
    unit: str = "auto"  # the unit of privacy: auto (patient where patient ids exist) | patient | image
    max_epsilon: float  # total epsilon this site's data may spend, all studies and rounds together
    delta: float  # the site's delta: epsilon is counted at it; requests may not exceed it
    min_noise_multiplier: float  # refuse rounds asking for less noise than this
    max_grad_norm: float  # refuse rounds asking for a larger clipping bound than this
    count_noise: float = 10.0  # std of the Gaussian noise on the training-set size it releases
    repeatable_noise: bool = False  # simulation only: noise seeded from the round (not private)

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise SitePolicyError(f"privacy.max_epsilon must be > 0, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise SitePolicyError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if not self.min_noise_multiplier >= 0:
            raise SitePolicyError(
                f"privacy.min_noise_multiplier must be >= 0, got {self.min_noise_multiplier}"
            )
        if not self.max_grad_norm > 0:
            raise SitePolicyError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not self.count_noise > 0:
            raise SitePolicyError(f"privacy.count_noise must be > 0, got {self.count_noise}")

    @classmethod
    def of(cls, site: SiteConfig) -> SitePolicy:
        """The training policy of a site config (its evaluation policy: client.evaluation)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dataclasses.asdict(site.privacy).items() if k in fields})

    @property
    def count_release(self) -> HistoryItem:
        """The release of the training-set size as an accountant step: Gaussian noise of std
        count_noise on a count of sensitivity 1, once."""
        return (self.count_noise, 1.0, 1)

    def allows(self) -> str:
        """What this site accepts, in one line, for refusal messages."""
        return (
            f"This site trains {'only ' if self.required else ''}with differential privacy"
            f"{'' if self.required else ' or without'}, Poisson sampling, noise multiplier >= "
            f"{self.min_noise_multiplier:g}, clipping norm <= {self.max_grad_norm:g}, delta <= {self.delta:g}, "
            f"and at most epsilon {self.max_epsilon:g} in all"
        )

    def unit_for(self, has_patients: bool) -> str | None:
        """The unit of privacy for data with (or without) patient ids; None: the policy cannot be met."""
        if self.unit == "patient" and not has_patients:
            return None
        return "patient" if self.unit != "image" and has_patients else "image"

    def check_mode(self, dp_enabled: bool) -> str | None:
        """Why a round without differential privacy is refused (privacy.required), or None."""
        if not dp_enabled and self.required:
            return (
                "the study asks for training without differential privacy, and this site's policy "
                "requires it (privacy.required: true)"
            )
        return None

    def check(self, request: PrivacyRequest) -> str | None:
        """Why this site refuses `request`, or None when it is at least as strict as the policy."""
        if not request.poisson_sampling:
            return (
                "the study asks for batches without Poisson sampling, which the site's epsilon "
                "assumes; this site trains only with Poisson sampling"
            )
        if request.noise_multiplier < self.min_noise_multiplier:
            return (
                f"noise multiplier {request.noise_multiplier:g} requested is below this site's "
                f"privacy.min_noise_multiplier {self.min_noise_multiplier:g}"
            )
        if request.max_grad_norm > self.max_grad_norm:
            return (
                f"clipping norm (max_grad_norm) {request.max_grad_norm:g} requested is above this "
                f"site's privacy.max_grad_norm {self.max_grad_norm:g}"
            )
        if request.delta > self.delta:
            return f"delta {request.delta:g} requested is above this site's privacy.delta {self.delta:g}"
        return None

    def projected_epsilon(self, history: Sequence[HistoryItem], planned: Sequence[HistoryItem]) -> float:
        """Epsilon (at the site's delta) after `history` plus the `planned` releases; nothing is kept."""
        return rdp_epsilon([*history, *planned], delta=self.delta)

    def would_exceed_budget(
        self, history: Sequence[HistoryItem], planned: Sequence[HistoryItem]
    ) -> str | None:
        """Why the planned releases ((noise, sample rate, steps) each) would take the site past
        privacy.max_epsilon, or None if they fit. `history` is what the site has spent so far."""
        spent = rdp_epsilon(history, delta=self.delta)
        after = self.projected_epsilon(history, planned)
        if after > self.max_epsilon:
            nm, q, steps = planned[-1]
            return (
                f"privacy budget: epsilon would reach {after:.3f} after this round "
                f"({steps} steps at noise {nm:g}, sample rate {q:g}), above this site's "
                f"privacy.max_epsilon {self.max_epsilon:g} at delta {self.delta:g} (spent so far: {spent:.3f})"
            )
        return None
