"""A class-balanced loss: weights from the training labels where the model trains, never with privacy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client import guard
from client.train import BalancedCrossEntropy, make_criterion
from common.config import ConfigError, validate_study
from common.round import RoundPlan
from common.schema import SiteConfig, StudyConfig
from tests.plans import round_config


def test_weights_make_each_class_count_equally():
    y = torch.tensor([1] * 90 + [0] * 10)
    crit = make_criterion(y, 2, balanced=True)
    assert torch.allclose(crit.class_weights, torch.tensor([5.0, 100 / 180]))
    logits = torch.randn(100, 2)
    per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
    class_totals = [
        (per_sample * crit.class_weights[y])[y == c].sum() / per_sample[y == c].mean() for c in (0, 1)
    ]
    assert torch.allclose(class_totals[0], class_totals[1])  # both classes weigh 50 samples' worth
    assert isinstance(make_criterion(y, 2, balanced=False), nn.CrossEntropyLoss)


def test_a_sample_loss_does_not_depend_on_the_rest_of_the_batch():
    crit = BalancedCrossEntropy(torch.tensor([3.0, 0.5]))
    logits, y = torch.randn(8, 2), torch.tensor([0, 1, 1, 1, 0, 1, 1, 1])
    crit.reduction = "none"
    alone = torch.stack([crit(logits[i : i + 1], y[i : i + 1])[0] for i in range(8)])
    assert torch.allclose(crit(logits, y), alone)
    crit.reduction = "mean"
    assert torch.allclose(crit(logits, y), alone.mean())


def test_an_absent_class_gets_weight_zero():
    crit = make_criterion(torch.tensor([1, 1, 1]), 3, balanced=True)
    assert crit.class_weights.tolist() == [0.0, 1.0, 0.0]


def test_never_with_privacy(tmp_path):
    study = StudyConfig()
    study.train.class_balance, study.privacy.enabled = True, True
    with pytest.raises(ConfigError, match=r"train\.class_balance.*privacy"):
        validate_study(study)
    cfg = round_config(class_balance=True, dp_enabled=True)
    plan, refusal = guard.plan_round(
        cfg, RoundPlan.from_config(cfg), SiteConfig(site="h", state_dir=str(tmp_path)), 100
    )
    assert plan is None and "class-balanced loss" in refusal
