"""A study over hospitals' own site configs: every run obeys each site's policy and spends its real ledger.

With `data.source: sites` the images a study touches are real patients'. So, unlike a study over
simulated data (synthetic or MedMNIST partitions, which keeps fresh ledgers per run inside DIR):

- before anything trains, every planned run is checked against every site's policy: a run without
  privacy (federated, local-only, centralized, leave-one-out of a non-private study) touches a site's
  images only where the site allows non-private training (`privacy.required: false`); otherwise the
  study stops, naming the site and the run;
- every federated run's sites keep their own `state_dir`, so their real ledgers count every round;
- a site's local-only reference trains through the site's own path (client.site.SiteRuntime: policy,
  guard, ledger), one round-equivalent at a time, like a federation of one;
- study.json says, per site, the epsilon the whole study spent on its images (every run's lines
  composed) beside the site's total and its budget: "unbounded" when a run trained them without
  DP (a plain federation or local-only reference, through the site's own path, or the centralized
  reference, which `record_pooled_release` writes to every site's ledger).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from client import guard
from client.ledger import TRAINING_KINDS, SiteAccountant, spending
from client.site import SiteRuntime
from common.config import ConfigError
from common.keys import Met
from common.privacy import rdp_epsilon, reported, request_config
from common.round import RoundPlan
from common.schema import SiteConfig, StudyConfig
from common.sitedata import SiteData
from common.transforms import augment_fn
from server.packages import initial_model
from server.study.plan import Part


def real_sites(study: StudyConfig) -> bool:
    """Whether the study's sites are hospitals' own site configs (their policies and ledgers apply)."""
    return study.data.source == "sites"


def check_policies(study: StudyConfig, sites: dict[str, SiteConfig], parts: list[Part]) -> None:
    """Stop before training when a planned run would train a site's images without privacy and the
    site's policy requires it (ConfigError naming the site and the run)."""
    for part in parts:
        if part.private:
            continue
        for name, site in sites.items():
            held_out = part.key.partition(":")[2]
            if name == held_out or not site.privacy.required:
                continue
            raise ConfigError(
                f"{study.source_path}: the study's run '{part.label}' would train on site '{name}''s images "
                f"without differential privacy, and its site config ({site.source_path}) requires it "
                f"(privacy.required: true); turn that run off in the study section (study.local, "
                f"study.centralized, study.leave_one_out, study.compare_privacy) or train with privacy"
            )


def train_at_site(
    study: StudyConfig,
    site: SiteConfig,
    data: SiteData,
    *,
    private: bool,
    on_round: Callable[[int, float], None] | None = None,
    start: nn.Module | None = None,
    study_id: str | None = None,
    rounds: range | None = None,
    local_epochs: int | None = None,
) -> tuple[nn.Module, dict]:
    """A site's model trained alone through its own path, charged to its ledger when private.

    Each round-equivalent is one `SiteRuntime.train` at the site (the study's RoundPlan, the site's
    policy and guard, its augmentation), so a refusal ends the training there, named in the info.
    By default a model of its own from the study's initial weights, rounds 1..study.rounds under a
    study id of its own; fine-tuning gives `start` (the federated model), the federation's
    `study_id` and the `rounds` after the federation's, so its ledger lines follow the federation's."""
    runtime = SiteRuntime(config=site, data=data, augment=augment_fn(site.data))
    model = start if start is not None else initial_model(study, in_channels=data.in_channels,
                                                           num_classes=data.num_classes)  # fmt: skip
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    study_id = study_id or f"{study.name}-local{'-dp' if private else ''}-{uuid.uuid4().hex[:8]}"
    info = {"n_train": int(len(data.train_y)), "private": private, "study_id": study_id, "refused": None}
    t0, epsilons = time.perf_counter(), []
    for rnd in rounds or range(1, study.rounds + 1):
        plan = RoundPlan.from_study(
            study, min(rnd, study.rounds), in_channels=data.in_channels, num_classes=data.num_classes,
            study_id=study_id,
        )  # fmt: skip
        plan = replace(plan, round=rnd, dp_enabled=private, class_balance=plan.class_balance and not private,
                       local_epochs=local_epochs or plan.local_epochs)  # fmt: skip
        config = plan.to_config() | (request_config(study.privacy) if private else {})
        r0 = time.perf_counter()
        reply = runtime.train(config, weights)
        if reply.refused:
            info["refused"] = reply.refused
            break
        weights = reply.weights
        epsilons.append(reported(float(reply.metrics[Met.EPSILON])) if private else None)
        if on_round is not None:
            on_round(rnd, time.perf_counter() - r0)
    model.load_state_dict(weights)
    spent = reported(study_epsilon(site, {study_id})) if private else None
    info |= {"epsilon": spent, "site_epsilon_by_round": epsilons if private else None}
    info |= {"delta": site.privacy.delta if private else None, "train_s": round(time.perf_counter() - t0, 3)}
    return model.eval(), info


def record_pooled_release(study: StudyConfig, sites: dict[str, SiteConfig], steps: int) -> str:
    """Write the centralized reference (every site's training images pooled, trained without DP) to
    each site's ledger, as a site writes its own round without privacy; returns the run's study id."""
    study_id = f"{study.name}-centralized-{uuid.uuid4().hex[:8]}"
    for site in sites.values():
        guard.record_nonprivate(site, TRAINING_KINDS, round_=1, study=study_id, steps=steps)
    return study_id


def study_epsilon(site: SiteConfig, study_ids: set[str]) -> float:
    """Epsilon of the lines of these runs in the site's ledger, composed (training budget): infinite
    when one of them trained the site's images without differential privacy. A site without a ledger
    reports what client.guard.spent says of it (nothing private, perhaps something not)."""
    if not site.state_dir:
        return guard.spent(site)[0]
    entries = SiteAccountant(site.state_dir).ledger.entries()
    kinds = spending(TRAINING_KINDS)
    history = [
        (e.noise_multiplier, e.sample_rate, e.steps)
        for e in entries
        if e.study in study_ids and e.kind in kinds
    ]
    return rdp_epsilon(history, delta=site.privacy.delta)


def privacy_spent(sites: dict[str, SiteConfig], study_ids: set[str]) -> dict[str, dict]:
    """Per site: the epsilon the whole study spent (all its runs composed), the site's total, its budget."""
    out = {}
    for name, site in sites.items():
        total = (
            SiteAccountant(site.state_dir).spent(site.privacy.delta)
            if site.state_dir
            else guard.spent(site)[0]
        )
        out[name] = {
            "study_epsilon": reported(round(study_epsilon(site, study_ids), 6)),
            "site_total_epsilon": reported(round(total, 6)),
            "max_epsilon": site.privacy.max_epsilon,
            "delta": site.privacy.delta,
        }
    return out
