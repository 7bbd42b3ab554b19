"""A site's local-only (and fine-tuned) models train through the site's own path, its augmentation
included (server.study.site_ledgers.train_at_site)."""

from __future__ import annotations

from common.data import load_site_data
from common.schema import (
    AugmentConfig,
    SiteConfig,
    SiteDataConfig,
    SitePolicyConfig,
    StudyConfig,
    SyntheticConfig,
)
from common.transforms import BatchAugment
from server.study.site_ledgers import train_at_site


def _site(tmp_path, augment: AugmentConfig) -> SiteConfig:
    data = SiteDataConfig(
        format="synthetic", synthetic=SyntheticConfig(train_per_site=32, test_per_site=8), augment=augment
    )
    return SiteConfig(
        site="hospital-a", data=data, privacy=SitePolicyConfig(required=False), state_dir=str(tmp_path)
    )


def _augmented_batches(tmp_path, monkeypatch, augment: AugmentConfig) -> int:
    calls = []
    original = BatchAugment.__call__
    monkeypatch.setattr(
        BatchAugment, "__call__", lambda self, x, g: calls.append(len(x)) or original(self, x, g)
    )
    study = StudyConfig(rounds=2)
    study.train.batch_size = 16
    site = _site(tmp_path, augment)
    _, info = train_at_site(study, site, load_site_data(site), private=False)
    assert info["refused"] is None, info
    return len(calls)


def test_a_sites_reference_model_trains_with_the_sites_own_augmentation(tmp_path, monkeypatch):
    augmented = _augmented_batches(tmp_path / "a", monkeypatch, AugmentConfig(flip=[1], prob=1.0))
    assert augmented == 4, "2 rounds x 1 epoch x 2 batches of 16, every batch through the site's augmentation"
    assert _augmented_batches(tmp_path / "b", monkeypatch, AugmentConfig()) == 0  # none configured: none run
