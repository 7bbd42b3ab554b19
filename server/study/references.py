"""A study's in-process references: a model trained on one site's data alone, or on all sites' pooled.

They are trained exactly as a site trains in the federation: the federation's initial weights (fresh,
or the `model.init_from` package's: server.packages.initial_model), the
study's RoundPlan for every round-equivalent (client.train.train_round, the ClientApp's own recipe),
the site's own augmentation, and under privacy the request a site builds from the study's privacy
section (common.privacy), with the noise derived for the same number of steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from client.randomness import RoundRandomness
from client.train import DPSettings, device, train_round
from common.privacy import PrivacyRequest, rdp_epsilon, request_config
from common.round import RoundPlan
from common.schema import StudyConfig
from server.packages import initial_model


def train_alone(
    study: StudyConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    in_channels: int,
    num_classes: int,
    private: bool,
    report_delta: float,
    augment_fn: Callable | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train one model on (x, y) as one site would train it through the whole federated study.

    `study.rounds` round-equivalents of `local_epochs` epochs, each with a fresh optimizer at that
    round's learning rate; with `private`, DP-SGD with the noise a site derives for the whole study
    (or `privacy.noise_multiplier`), epsilon counted over all rounds' steps at `report_delta` (the
    site's policy delta). A class-balanced loss is never used with privacy (common.config).
    """
    model = initial_model(study, in_channels=in_channels, num_classes=num_classes).to(device())
    batches = math.ceil(len(y) / study.train.batch_size)
    request = None
    if private:
        request = PrivacyRequest.from_config(
            request_config(study.privacy),
            sample_rate=1.0 / batches,
            steps_total=study.rounds * study.train.local_epochs * batches,
        )
    history, epsilons, losses = [], [], []
    t0 = time.perf_counter()
    for rnd in range(1, study.rounds + 1):
        plan = RoundPlan.from_study(study, rnd, in_channels=in_channels, num_classes=num_classes)
        plan = replace(plan, class_balance=False, dp_enabled=True) if private else plan
        r0 = time.perf_counter()
        result = train_round(
            model,
            x,
            y,
            plan,
            augment_fn=augment_fn,
            randomness=RoundRandomness.secret(device()) if private else None,
            dp=DPSettings(request, on_steps=lambda dp: history.extend(dp.history())) if private else None,
        )
        model = result.model
        losses.append(round(result.loss, 6))
        epsilons.append(rdp_epsilon(history, delta=report_delta) if private else None)
        if on_round is not None:
            on_round(rnd, time.perf_counter() - r0)
    return model.eval(), {
        "n_train": int(len(y)),
        "epochs": study.rounds * study.train.local_epochs,
        "loss_by_round": losses,
        "private": private,
        "noise_multiplier": request.noise_multiplier if request else None,
        "epsilon": epsilons[-1] if private else None,
        "delta": report_delta if private else None,
        "epsilon_by_round": epsilons if private else None,
        "train_s": round(time.perf_counter() - t0, 3),
    }
