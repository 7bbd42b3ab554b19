"""A hospital site at work: its data, model, policy and ledger, and what it does when asked.

`SiteRuntime.train(config, weights)` and `SiteRuntime.evaluate(config, weights)` take plain values (the
round's ConfigRecord as a dict, the global weights as a state dict) and return a `SiteReply` of plain
values: no Flower here, so the ClientApp (client.app) only converts Messages, and the training path can
be driven and tested without an engine.

Training: the round's `RoundPlan` (common.round), checked against the site's own policy (a site whose
policy requires privacy refuses a round without it); with privacy, the guard's check of the request
and the budget (client.guard) and secret randomness, then the one recipe (client.train.train_round);
the ledger line is written before the reply is made. A private round's reply holds the noised update,
the noised training-set size and the accounting, nothing else (no loss, no time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from client import evaluation, guard, local_norm
from client.ledger import EVALUATION_KINDS, TRAINING_KINDS
from client.policy import SitePolicy
from client.profile import record_training_profile
from client.scaffold_correction import correction_problem, split_correction
from client.train import DPSettings, RoundResult, device, predict, train_round
from common.data import load_site_data
from common.keys import Cfg, Met
from common.model_spec import spec_problem
from common.models import build_model
from common.round import RoundPlan
from common.schema import SiteConfig
from common.sitedata import SiteData
from common.transforms import augment_fn

log = logging.getLogger("fedward.site")
THREADS_ENV = "FEDWARD_SITE_THREADS"  # simulation: CPU threads per site process
NO_PATIENTS = (
    "its policy asks for patient-level privacy (privacy.unit: patient) and its data has no patient ids; "
    "give the label sheet a patient_id column or set privacy.unit: auto"
)


@dataclass
class SiteReply:
    """What a site sends back: its name, aggregate metrics, the model weights when it trained, or
    the reason it refused."""

    site: str
    metrics: dict[str, int | float | list[int]]
    weights: dict[str, torch.Tensor] | None = None
    refused: str = ""
    release: str = ""  # an evaluation's release (client.evaluation)
    input: str = ""  # a train reply: how the site prepares its images (SiteRuntime.input_description)


@dataclass
class SiteRuntime:
    """One site's loaded data and model, kept across rounds in a long-lived process."""

    config: SiteConfig
    data: SiteData
    model: torch.nn.Module | None = None
    model_key: tuple = ()
    augment: Callable | None = None  # the site's own training augmentation (site config)

    @classmethod
    def load(cls, config: SiteConfig) -> SiteRuntime:
        """Read the site's data (raises common.sitedata.SiteDataError naming what is wrong)."""
        return cls(config=config, data=load_site_data(config), augment=augment_fn(config.data))

    def model_for(self, plan: RoundPlan, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The site's model of the plan's architecture, holding `weights`."""
        key = (plan.model, plan.in_channels, plan.num_classes)
        if self.model is None or key != self.model_key:
            self.model = build_model(plan.model, in_channels=key[1], num_classes=key[2]).to(device())
            self.model_key = key
        self.model.load_state_dict(dict(weights))
        return self.model

    # ------------------------------------------------------------------ train

    def train(self, config: Mapping[str, object], weights: Mapping[str, torch.Tensor]) -> SiteReply:
        """One round of local training as the coordinator's `config` asks, within the site's policy."""
        plan = RoundPlan.from_config(config)
        refusal = (
            guard.study_id_problem(plan)
            or spec_problem(plan, self.data)
            or guard.work_problem(self.config, plan, plan.dp_enabled and self._patient_level())
            or SitePolicy.of(self.config).check_mode(plan.dp_enabled)
        )
        if refusal:
            return self.refusal(guard.refusal_text(self.config, plan.round, refusal))
        received, correction = split_correction(weights)  # SCAFFOLD's correction, when one came
        weights = self._own_norms(plan, received)
        model = self.model_for(plan, weights)
        if correction is not None and (problem := correction_problem(model, correction, plan.local_norm)):
            return self.refusal(f"site '{self.config.site}' refuses round {plan.round}: {problem}")
        if not plan.dp_enabled:
            record_training_profile(self.config.state_dir, plan.study_id, self.data)  # drift's reference
            result = train_round(model, self.data.train_x, self.data.train_y, plan,
                                 augment_fn=self.augment, correction=correction)  # fmt: skip
            guard.record_nonprivate(self.config, TRAINING_KINDS, round_=plan.round, study=plan.study_id,
                                    steps=result.steps)  # fmt: skip
            return self._reply(plan, result, exact=True, received=received)
        # the budget check to the ledger line is one step: one private training at a time per ledger
        with guard.site_lock(self.config):
            return self._train_private(plan, config, model, received, correction)

    def _patient_level(self) -> bool:
        """Whether a private round here counts patients (its batches are then whole patients)."""
        return SitePolicy.of(self.config).unit_for(bool(self.data.train_patients)) == "patient"

    def _own_norms(self, plan: RoundPlan, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """With `local_norm`, the global weights with this site's own normalization parameters."""
        if not plan.local_norm:
            return weights
        return local_norm.with_local(weights, local_norm.load_local(self.config.state_dir, plan.study_id))

    def _train_private(
        self, plan: RoundPlan, config: Mapping, model: torch.nn.Module, received: Mapping, correction
    ) -> SiteReply:
        from client.dp import PoissonPlan  # Opacus (about a second to import): private rounds only

        private, refusal = guard.plan_round(
            config, plan, self.config, len(self.data.train_y), device(), patients=self.data.train_patients
        )
        if refusal:
            log.warning(refusal)
            return self.refusal(refusal)
        # drift's reference, once the round is accepted: a refused request writes nothing
        record_training_profile(self.config.state_dir, plan.study_id, self.data)
        entries = []
        result = train_round(
            model,
            self.data.train_x,
            self.data.train_y,
            plan,
            augment_fn=self.augment,
            randomness=private.randomness,
            dp=DPSettings(
                private.request,
                poisson=PoissonPlan(private.sample_rate, private.count * private.sample_rate),
                on_steps=lambda dp: entries.append(guard.record_round(private, dp)),  # before the reply
                patients=private.groups,
                images_per_patient=self.config.limits.max_images_per_patient,
                patients_per_step=guard.patients_per_step(self.config, plan),
            ),
            correction=correction,
        )
        reply = self._reply(plan, result, exact=False, received=received)
        entry = entries[0]
        reply.metrics |= {
            Met.NUM_EXAMPLES: int(private.count),  # the released, noised count: FedAvg's weight
            Met.EPSILON: private.accountant.spent(entry.delta),
            Met.DELTA: entry.delta,
            Met.NOISE_MULTIPLIER: entry.noise_multiplier,
            Met.STEPS: entry.steps,
            Met.SAMPLE_RATE: entry.sample_rate,
            Met.REPEATABLE_NOISE: int(entry.repeatable),
            Met.PRIVACY_UNIT: int(private.unit == "patient"),
        }
        return reply

    def _reply(self, plan: RoundPlan, result: RoundResult, *, exact: bool, received: Mapping) -> SiteReply:
        """The trained weights; with `exact` (a non-private round) also the exact size, loss and time.
        A private round sends none of those: they are not covered by its epsilon. With `local_norm` the
        normalization parameters stay here and go back as received (client.local_norm)."""
        self.model = result.model
        weights = result.model.state_dict()
        if plan.local_norm:
            keys = local_norm.norm_keys(result.model)
            local_norm.save_local(self.config.state_dir, plan.study_id, {k: weights[k] for k in keys})
            weights = local_norm.reply_weights(weights, received, keys)
        metrics: dict = {}
        if exact:
            metrics = {
                Met.NUM_EXAMPLES: len(self.data.train_y),
                Met.STEPS: result.steps,  # optimizer steps: SCAFFOLD's control variates need them
                Met.TRAIN_LOSS: result.loss,
                Met.TRAIN_S: result.seconds,
            }
        log.info(
            "site %s round %d: loss %.4f in %.1fs", self.config.site, plan.round, result.loss, result.seconds
        )
        return SiteReply(
            self.config.site,
            metrics,
            weights=weights,
            input=json.dumps(self.input_description()),
        )

    def input_description(self) -> dict:
        """How this site reads and prepares its images, for the model package: settings, no image data.
        Synthetic and MedMNIST arrays come prepared at their own size; a folder site's are its config's."""
        data, shape = self.config.data, list(self.data.train_x.shape[1:])
        if data.format in ("synthetic", "medmnist"):
            prepare = {"size": shape[1:], "spatial": "resize", "channels": shape[0]}
        else:
            prepare = dataclasses.asdict(data.preprocess)
        return {"format": data.format, "colour": data.colour, "frame": data.frame, "window": list(data.window),
                "volume": data.volume or self.data.train_x.ndim == 5, "preprocess": prepare}  # fmt: skip

    def refusal(self, reason: str) -> SiteReply:
        epsilon, delta = guard.spent(self.config)
        metrics = {Met.NUM_EXAMPLES: 0, Met.EPSILON: epsilon, Met.DELTA: delta, Met.STEPS: 0}
        return SiteReply(self.config.site, metrics, refused=reason)

    # ------------------------------------------------------------------ evaluate

    def _split_problem(self, split: str) -> str | None:
        """Why the site cannot evaluate on `split` (None when it can)."""
        if split not in ("test", "val"):
            return f"it evaluates on its 'test' or 'val' split, not {split!r}"
        if split == "val" and (self.data.val_y is None or len(self.data.val_y) == 0):
            return "it has no validation images to choose an operating point on"
        if split == "val" and self.data.test_patients and not self.data.val_patients:
            return "its validation images have no patient list, so their release cannot be patient-level"
        return None

    def evaluate(self, config: Mapping[str, object], weights: Mapping[str, torch.Tensor]) -> SiteReply:
        """Test `weights` on the site's test data (or its validation data, `eval-split: val`, for the
        operating point); what goes back is the site's evaluation policy's
        release (client.evaluation), charged to its ledger first when it is a private one."""
        plan = RoundPlan.from_config(config)
        split = str(config.get(Cfg.EVAL_SPLIT, "test"))
        problem = guard.study_id_problem(plan) or spec_problem(plan, self.data) or self._split_problem(split)
        if problem:
            return SiteReply(
                self.config.site, {}, refused=guard.refusal_text(self.config, plan.round, problem)
            )
        model = self.model_for(plan, self._own_norms(plan, weights))
        x, y, patients = (
            (self.data.val_x, self.data.val_y, self.data.val_patients)
            if split == "val"
            else (self.data.test_x, self.data.test_y, self.data.test_patients)
        )
        policy = self.config.privacy.evaluation
        unit = SitePolicy.of(self.config).unit_for(bool(patients))
        if unit is None:
            return SiteReply(
                self.config.site, {}, refused=guard.refusal_text(self.config, plan.round, NO_PATIENTS)
            )
        # The budget before any image is predicted: a refusal that took longer with more test images
        # would tell their exact number to whoever times it, uncharged (checked again, under the
        # ledger's lock, before the release is written)
        refusal = evaluation.refusal(self.config, evaluation.planned_spend(policy))
        if refusal:
            log.warning(refusal)
            return SiteReply(self.config.site, {}, refused=refusal, release=policy.release)
        t0 = time.perf_counter()
        labels, probs = y.numpy(), predict(model, x)
        per_unit = 1
        if unit == "patient" and policy.release == "dp_histogram":  # a patient's images, at most the cap
            keep = evaluation.patient_subset(patients, policy.max_images_per_patient)
            labels, probs, per_unit = labels[keep], probs[keep], policy.max_images_per_patient
        noise = evaluation.randomness(self.config, plan.seed, plan.round).noise
        if self.data.task == "segmentation":  # label maps: the predicted class of every pixel
            out = evaluation.segmentation_release(
                labels, probs.argmax(axis=1), self.data.num_classes, policy, noise, per_unit=per_unit
            )
        else:
            out = evaluation.release(labels, probs, policy, noise, per_unit=per_unit)
        metrics = dict(out.metrics) | {Met.PRIVACY_UNIT: int(unit == "patient")}
        if out.spends is None:  # a protected release sends no time either: it grows with the exact n_test
            guard.record_nonprivate(self.config, EVALUATION_KINDS, round_=plan.round, study=plan.study_id)
            metrics[Met.EVAL_S] = time.perf_counter() - t0
            return SiteReply(self.config.site, metrics, release=out.kind)
        return self._charged_release(plan, out, metrics)

    def _charged_release(self, plan: RoundPlan, out: evaluation.Release, metrics: dict) -> SiteReply:
        """A protected evaluation's reply, once its ledger line is written (or the refusal, when the
        budget was spent by another study meanwhile: checked again under the ledger's lock)."""
        with guard.site_lock(self.config):
            refusal = evaluation.refusal(self.config, out.spends)
            if refusal:
                log.warning(refusal)
                return SiteReply(self.config.site, {}, refused=refusal, release=out.kind)
            metrics[Met.EVAL_EPSILON] = evaluation.record(
                self.config, out, study=plan.study_id, round_=plan.round,
                repeatable=self.config.privacy.repeatable_noise,
            )  # fmt: skip
        return SiteReply(self.config.site, metrics, release=out.kind)


_RUNTIMES: dict[str, SiteRuntime] = {}  # per process: data and model stay loaded across rounds


def runtime_for(config: SiteConfig) -> SiteRuntime:
    """This process's runtime for `config`, loaded on first use."""
    key = f"{config.site}:{config.source_path}:{config.data}"
    if key not in _RUNTIMES:
        threads = os.environ.get(THREADS_ENV)
        if threads:
            torch.set_num_threads(int(threads))
        _RUNTIMES[key] = SiteRuntime.load(config)
    return _RUNTIMES[key]
