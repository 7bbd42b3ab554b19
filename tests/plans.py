"""Round configs for tests, made the way the coordinator makes them (common.round.RoundPlan)."""

from __future__ import annotations

from dataclasses import replace

from common.round import RoundPlan

BASE = RoundPlan(
    round=1,
    local_epochs=1,
    batch_size=8,
    lr=1e-3,
    optimizer="adam",
    augment=False,
    class_balance=False,
    model="cnn28",
    in_channels=1,
    num_classes=2,
    seed=0,
    study_id="test-study",
    planned_rounds=1,
    dp_enabled=False,
)


def plan(**overrides) -> RoundPlan:
    return replace(BASE, **overrides)


def round_config(**overrides) -> dict:
    """A round's ConfigRecord values; privacy keys (common.privacy.PrivacyKey) may be added by the test."""
    return plan(**overrides).to_config()
