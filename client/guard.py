"""The site's privacy guard: decides whether a round may be trained, and counts it when it is.

Before training, the coordinator's request (from the round's ConfigRecord) is checked against the
site's own policy (its site config, which the coordinator cannot change) and against the budget left
in the site's privacy ledger. A refused round trains nothing and says why. A trained round is
written to the ledger (flushed to disk) before its update leaves the site.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass

from client.dp import PrivateTraining
from client.ledger import LedgerEntry, SiteAccountant
from client.policy import SitePolicy
from common.privacy import PrivacyRequest
from common.round import RoundPlan
from common.schema import SiteConfig


@dataclass
class PrivateRound:
    request: PrivacyRequest
    policy: SitePolicy
    accountant: SiteAccountant
    sample_rate: float
    steps: int  # planned: local epochs x batches per epoch (Poisson: expected batches)
    round: int
    study_id: str


def site_lock(site: SiteConfig):
    """Context manager: the site's ledger lock, to hold from `plan_round` to `record_round` so that
    concurrent trainings at one site (two studies sharing its ledger) cannot overspend its budget.
    A site without a state_dir has no ledger (its private rounds are refused): nothing to lock."""
    if not site.state_dir:
        return contextlib.nullcontext()
    return SiteAccountant(site.state_dir).ledger.locked()


def policy_of(site: SiteConfig) -> SitePolicy:
    return SitePolicy(**dataclasses.asdict(site.privacy))


def plan_round(
    cfg: Mapping, plan: RoundPlan, site: SiteConfig, n_train: int
) -> tuple[PrivateRound | None, str | None]:
    """(the round's private plan, None) when the site may train `plan` privately under the privacy
    request in `cfg` (the round's ConfigRecord), or (None, the reason it refuses)."""
    if plan.class_balance:
        return None, (
            f"site '{site.site}' refuses round {plan.round}: a class-balanced loss (weights "
            "counted on the site's data) is not private; the study must turn train.class_balance off"
        )
    if not site.state_dir:
        return None, (
            f"site '{site.site}' has no state_dir in its site config: the privacy ledger needs a "
            f"folder that outlives the process"
        )
    batches = math.ceil(n_train / plan.batch_size)
    sample_rate, steps = 1.0 / batches, plan.local_epochs * batches
    request = PrivacyRequest.from_config(
        cfg, sample_rate=sample_rate, steps_total=plan.planned_rounds * steps
    )
    if request.secure_mode and importlib.util.find_spec("torchcsprng") is None:
        return None, (
            f"site '{site.site}' cannot train with secure_mode: Opacus needs the torchcsprng package "
            f"for cryptographically secure noise and this site does not have it installed"
        )
    policy, accountant = policy_of(site), SiteAccountant(site.state_dir)
    refusal = accountant.refusal(policy, request, sample_rate=sample_rate, steps=steps)
    if refusal:
        return None, f"site '{site.site}' refuses round {plan.round}: {refusal}"
    return PrivateRound(request, policy, accountant, sample_rate, steps, plan.round, plan.study_id), None


def record_round(plan: PrivateRound, dp: PrivateTraining) -> LedgerEntry:
    """Write the round's real spending to the ledger; a round trained again counts again."""
    retry = any(e.study == plan.study_id and e.round == plan.round for e in plan.accountant.ledger.entries())
    return plan.accountant.record_round(
        round=plan.round, study=plan.study_id, delta=plan.policy.delta, retry=retry, **dp.spending()
    )


def spent(site: SiteConfig) -> tuple[float, float]:
    """(epsilon, delta) spent so far at this site, over its whole ledger, at the site's delta."""
    if not site.state_dir:
        return 0.0, site.privacy.delta
    return SiteAccountant(site.state_dir).epsilon(site.privacy.delta), site.privacy.delta
