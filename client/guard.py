"""The site's privacy guard: decides whether a round may be trained, and counts it when it is.

Before training, the coordinator's request (the round's ConfigRecord) is checked against the site's own
policy (its site config, which the coordinator cannot change) and against the budget left in the site's
privacy ledger. A refused round trains nothing and says why, naming the policy field. A trained round
is written to the ledger (flushed to disk) before its update leaves the site.

What a private round releases besides the noised update is protected too: the site's training-set
size, which FedAvg weighs updates by and which sets the sample rate (and so the number of steps the
coordinator can see), is released once per study with Gaussian noise (`privacy.count_noise`) and
charged to the ledger as a `count` line as soon as it is drawn (a refusal depends on it too); the
training loss and time are not sent at all.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from client.ledger import LedgerEntry, SiteAccountant
from client.patients import patient_groups
from client.policy import SitePolicy
from client.randomness import RoundRandomness
from common.privacy import PrivacyConfigError, PrivacyKey, PrivacyRequest, rdp_epsilon
from common.round import RoundPlan
from common.schema import SiteConfig

if TYPE_CHECKING:  # client.dp loads Opacus: the site imports it where a round is private
    from client.dp import PrivateTraining

log = logging.getLogger("fedward.site")


@dataclass
class PrivateRound:
    request: PrivacyRequest
    policy: SitePolicy
    accountant: SiteAccountant
    randomness: RoundRandomness
    count: float  # the noised training-set size (images, or patients) this site releases for the study
    sample_rate: float  # 1 / batches, batches = ceil(count / batch size): from the released count only
    steps: int  # planned: local epochs x batches per epoch
    round: int
    study_id: str
    unit: str = "image"  # image | patient (then batch size and count are patients)
    groups: list[list[int]] | None = None  # patient-level: each patient's training images


def site_lock(site: SiteConfig):
    """Context manager: the site's ledger lock, to hold from `plan_round` to `record_round` so that
    concurrent trainings at one site (two studies sharing its ledger) cannot overspend its budget.
    A site without a state_dir has no ledger (its private rounds are refused): nothing to lock."""
    if not site.state_dir:
        return contextlib.nullcontext()
    return SiteAccountant(site.state_dir).ledger.locked()


MAX_STUDY_ID = 256  # characters: a study's id is kept in every ledger line the study writes


def study_id_problem(plan: RoundPlan) -> str | None:
    """Why the site refuses the request's study id (or None): longer than MAX_STUDY_ID, it would make
    every ledger line the study writes as long, and the ledger is read whole before each line."""
    if len(plan.study_id) > MAX_STUDY_ID:
        return (
            f"its study id is {len(plan.study_id)} characters long, more than the {MAX_STUDY_ID} a site keeps "
            "in its ledger; the study's name must be shorter"
        )
    return None


def refusal_text(site: SiteConfig, round_: int, reason: str) -> str:
    return f"site '{site.site}' refuses round {round_}: {reason}. {SitePolicy.of(site).allows()}"


def work_problem(site: SiteConfig, plan: RoundPlan, patient_level: bool = False) -> str | None:
    """Why the round asks more work than the site's `limits` allow, or a batch, epochs or views of
    none (None: it does not). The limits bound what one round can cost the site whatever the
    coordinator sends: at most max_local_epochs x max_augment_views passes over its data, and at most
    max_step_images images computed at once (the memory a step takes; a private round cuts its batches
    into physical ones of train.max_physical_batch, or at a `patient_level` site into batches of whole
    patients that fit, each bringing at most max_images_per_patient images: patients_per_step). They
    are not counted in steps or in the site's images: a limit on those would depend on the exact
    number of images, and its refusals would tell it, uncharged, to a coordinator that tries batch
    sizes."""
    for name, value in (("batch_size", plan.batch_size), ("local_epochs", plan.local_epochs),
                        ("augment_views", plan.augment_views)):  # fmt: skip
        if value < 1:
            return f"{name} {value} is not a positive number"
    asked = {"max_local_epochs": plan.local_epochs, "max_augment_views": plan.augment_views}
    for key, value in asked.items():
        limit = getattr(site.limits, key)
        if value > limit:
            return f"{key.removeprefix('max_')} {value} is more than this site's limits.{key} {limit}"
    return _step_size_problem(site, plan, patient_level)


def _step_size_problem(site: SiteConfig, plan: RoundPlan, patient_level: bool) -> str | None:
    """Why a step would compute more images at once than the site's limits.max_step_images (or None)."""
    limit = site.limits.max_step_images
    if patient_level:  # the site cuts batches of patients itself (patients_per_step)
        at_once = site.limits.max_images_per_patient * plan.augment_views
        if at_once > limit:
            return (
                f"one patient's images would be {at_once} at once (up to limits.max_images_per_patient "
                f"{site.limits.max_images_per_patient}, {plan.augment_views} view(s) each), more than this "
                f"site's limits.max_step_images {limit}; the study must ask fewer views"
            )
        return None
    physical = plan.max_physical_batch if plan.dp_enabled and plan.max_physical_batch > 0 else plan.batch_size
    at_once = min(plan.batch_size, physical) * plan.augment_views
    if at_once > limit:
        return (
            f"a step would compute {at_once} images at once (batch {plan.batch_size}, physical batch "
            f"{plan.max_physical_batch or 'none'}, {plan.augment_views} view(s)), more than this site's "
            f"limits.max_step_images {limit}; a private study can keep its batch and set "
            "train.max_physical_batch"
        )
    return None


def patients_per_step(site: SiteConfig, plan: RoundPlan) -> int:
    """A patient-level private round's physical batch, in whole patients: as many as the site's
    limits.max_step_images holds when each brings its most images (max_images_per_patient) and views.
    The logical (Poisson) batch of patients is cut into such batches, clipped per patient and noised
    once (client.train.physical_batches), so the bound holds whatever size a batch is drawn at."""
    return max(1, site.limits.max_step_images // (site.limits.max_images_per_patient * plan.augment_views))


def plan_round(
    cfg: Mapping,
    plan: RoundPlan,
    site: SiteConfig,
    n_train: int,
    device: torch.device | str = "cpu",
    patients: list[str] | None = None,
) -> tuple[PrivateRound | None, str | None]:
    """(the round's private plan, None) when the site may train `plan` privately under the privacy
    request in `cfg` (the round's ConfigRecord), or (None, the reason it refuses). With `patients` (the
    patient of each training image) and the policy's unit, the unit of privacy is a patient: the
    count, the batch size and the sampling are in patients."""
    policy = SitePolicy.of(site)
    unit = policy.unit_for(bool(patients))
    problem = _precondition_problem(plan, site, unit) or _request_problem(cfg, policy)
    if problem:
        return None, refusal_text(site, plan.round, problem)
    accountant = SiteAccountant(site.state_dir)
    groups = patient_groups(patients) if unit == "patient" else None
    n_train = len(groups) if groups is not None else n_train
    randomness = (
        RoundRandomness.repeatable(plan.seed, plan.round, device)
        if policy.repeatable_noise
        else RoundRandomness.secret(device)
    )
    count = accountant.released_count(plan.study_id)
    if count is None:
        count, refusal = _release_count(plan, site, policy, accountant, n_train, randomness)
        if refusal:
            return None, refusal_text(site, plan.round, refusal)
    batches = math.ceil(count / plan.batch_size)
    sample_rate, steps = 1.0 / batches, plan.local_epochs * batches
    try:
        request = PrivacyRequest.from_config(
            cfg,
            sample_rate=sample_rate,
            steps_total=plan.planned_rounds * steps,
            fixed=(policy.count_release,),
        )
    except PrivacyConfigError as err:
        return None, refusal_text(site, plan.round, f"its privacy request cannot be read ({err})")
    request = _with_per_image_gradients(request, plan, patient_level=groups is not None)
    private = PrivateRound(
        request, policy, accountant, randomness, count, sample_rate, steps, plan.round, plan.study_id, unit,
        groups,
    )  # fmt: skip
    planned = [(request.noise_multiplier, sample_rate, steps)]
    refusal = policy.check(request) or policy.would_exceed_budget(accountant.history(), planned)
    if refusal:
        return None, refusal_text(site, plan.round, refusal)
    if policy.repeatable_noise:
        log.warning(
            "site %s round %d: noise and sampling seeded from the round (privacy.repeatable_noise: true): "
            "this round is NOT private against the coordinator", site.site, plan.round,
        )  # fmt: skip
    return private, None


def _with_per_image_gradients(
    request: PrivacyRequest, plan: RoundPlan, *, patient_level: bool
) -> PrivacyRequest:
    """The request in `hooks` mode where ghost clipping cannot clip each image (or patient) once:
    per-patient sums and the mean of an image's views need per-image gradients (ghost clipping would
    clip each view as an image of its own, multiplying what one image can contribute), and ghost
    clipping needs a loss per image, which segmentation's Dice loss (a batch mean) does not give."""
    if request.grad_sample_mode == "ghost" and (
        patient_level or plan.augment_views > 1 or plan.task != "classification"
    ):
        return replace(request, grad_sample_mode="hooks")
    return request


def _precondition_problem(plan: RoundPlan, site: SiteConfig, unit: str | None) -> str | None:
    """Why the site cannot train `plan` privately at all, whatever the request says (or None)."""
    if plan.class_balance:
        return (
            "a class-balanced loss (weights counted on the site's data) is not private; "
            "the study must turn train.class_balance off"
        )
    if plan.proximal_mu > 0:
        return (
            f"FedProx's proximal term (proximal-mu {plan.proximal_mu:g}) is not clipped per sample, so DP-SGD "
            "would drop it silently; the study must use strategy fedavg, fedavgm or fedadam with privacy"
        )
    if not site.state_dir:
        return "it has no state_dir in its site config: the privacy ledger needs a folder that outlives the process"
    if unit is None:
        return (
            "its policy asks for patient-level privacy (privacy.unit: patient) and its data has no patient "
            "ids; give the label sheet a patient_id column or set privacy.unit: auto"
        )
    return None


def _request_problem(cfg: Mapping, policy: SitePolicy) -> str | None:
    """Why the site refuses the privacy request whatever the size of its data (or None): every field but
    a noise the site derives from the target epsilon, which needs the count. Checked before the count
    is drawn, so that such a refusal releases nothing and costs nothing."""
    derived = PrivacyKey.NOISE_MULTIPLIER not in cfg and PrivacyKey.TARGET_EPSILON in cfg
    as_sent = {**cfg, PrivacyKey.NOISE_MULTIPLIER: math.inf} if derived else cfg  # inf: above any minimum
    try:
        request = PrivacyRequest.from_config(as_sent, sample_rate=1.0, steps_total=1)
    except PrivacyConfigError as err:
        return f"its privacy request cannot be read ({err})"
    if problem := policy.check(request):
        return problem
    if not 0 < request.delta < 1:
        return f"its delta {request.delta:g} is not in (0, 1)"
    if derived and not request.target_epsilon > (
        alone := rdp_epsilon([policy.count_release], delta=request.delta)
    ):
        return (
            f"its target epsilon {request.target_epsilon:g} leaves nothing for training: releasing the "
            f"training-set size alone spends {alone:.3f} at delta {request.delta:g}"
        )
    return None


def _release_count(
    plan: RoundPlan,
    site: SiteConfig,
    policy: SitePolicy,
    accountant: SiteAccountant,
    n_train: int,
    randomness: RoundRandomness,
) -> tuple[float | None, str | None]:
    """(the study's noised training-set size, None), drawn and charged to the ledger at once, or (None,
    why the budget cannot pay for it). Charged when drawn, not when a round is trained: everything the
    site decides from here on (the sample rate, the steps, a derived noise, the budget check) depends on
    the count, so a refusal tells the coordinator something of it too; a count drawn afresh for every
    refused request would let it average the noise away, uncharged."""
    if policy.projected_epsilon(accountant.history(), [policy.count_release]) > policy.max_epsilon:
        return None, (
            f"privacy budget: releasing this study's training-set size (noise {policy.count_noise:g}) would "
            f"take the site past its privacy.max_epsilon {policy.max_epsilon:g} at delta {policy.delta:g}"
        )
    noise = float(torch.randn((), generator=randomness.release)) * policy.count_noise
    count = max(1.0, round(n_train + noise))
    noise_multiplier, sample_rate, steps = policy.count_release
    accountant.record_round(
        round=0, kind="count", value=count, steps=steps, sample_rate=sample_rate,
        noise_multiplier=noise_multiplier, max_grad_norm=1.0, study=plan.study_id, delta=policy.delta,
        repeatable=randomness.repeatable,
    )  # fmt: skip
    return count, None


def record_round(private: PrivateRound, dp: PrivateTraining) -> LedgerEntry:
    """Write the round's real spending to the ledger (its count was written when drawn, in
    `plan_round`); a round trained again counts again."""
    ledger = private.accountant
    common = dict(
        study=private.study_id, delta=private.policy.delta, repeatable=private.randomness.repeatable
    )
    retry = any(
        e.study == private.study_id and e.kind == "train" and e.round == private.round
        for e in ledger.ledger.entries()
    )
    return ledger.record_round(round=private.round, retry=retry, **common, **dp.spending())


def record_nonprivate(
    site: SiteConfig, budget: tuple[str, ...], *, round_: int, study: str, steps: int = 1
) -> None:
    """Write a release of the images of `budget` without differential privacy to the ledger before it
    leaves (a round trained without DP: TRAINING_KINDS; an `exact` or `summary` evaluation:
    EVALUATION_KINDS): from then on the site reports their epsilon as infinite. A site without a
    state_dir keeps no ledger (and trains nothing privately)."""
    if site.state_dir:
        SiteAccountant(site.state_dir).record_nonprivate(
            budget=budget, round=round_, steps=max(1, steps), delta=site.privacy.delta, study=study
        )


def spent(site: SiteConfig) -> tuple[float, float]:
    """(epsilon, delta) spent so far on this site's training images, over its whole ledger, at the
    site's delta: infinite once any round released them without differential privacy. Without a
    state_dir there is no ledger and no private round: 0 where the policy requires privacy (nothing
    trains), infinite where it allows training without (the site cannot know it did not)."""
    if not site.state_dir:
        return (0.0 if site.privacy.required else math.inf), site.privacy.delta
    return SiteAccountant(site.state_dir).spent(site.privacy.delta), site.privacy.delta
