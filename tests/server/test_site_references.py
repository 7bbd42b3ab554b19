"""A site's local-only (and fine-tuned) models train through the site's own path, its augmentation
included (server.study.site_ledgers.train_at_site)."""

from __future__ import annotations

from common.data import load_site_data
from common.files import json_safe
from common.schema import (
    AugmentConfig,
    SiteConfig,
    SiteDataConfig,
    SitePolicyConfig,
    StudyConfig,
    SyntheticConfig,
)
from common.transforms import BatchAugment
from server.report.tables import _privacy_spent_table
from server.study.site_ledgers import privacy_spent, record_pooled_release, train_at_site


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


def test_a_reference_trained_without_privacy_leaves_the_sites_reported_epsilon_unbounded(tmp_path):
    """A site that allows it trains a plain reference, then a private one: study.json's privacy_spent
    says the study's and the site's epsilon are unbounded (the plain run released the images), while
    the private run alone is finite; the report writes "unbounded"."""
    study = StudyConfig(rounds=1)
    study.train.batch_size = 16
    site = _site(tmp_path, AugmentConfig())
    site.privacy.max_epsilon = 100.0
    data = load_site_data(site)
    _, plain = train_at_site(study, site, data, private=False)
    study.privacy.enabled, study.privacy.noise_multiplier = True, 1.0
    _, private = train_at_site(study, site, data, private=True)
    assert plain["refused"] is None and private["refused"] is None
    assert 0 < private["epsilon"] < 100.0  # that run's own lines: finite

    spent = privacy_spent({"hospital-a": site}, {plain["study_id"], private["study_id"]})["hospital-a"]
    assert (
        spent["study_epsilon"] == spent["site_total_epsilon"] == "unbounded"
    )  # a word: JSON has no infinity
    only_private = privacy_spent({"hospital-a": site}, {private["study_id"]})["hospital-a"]
    assert only_private["study_epsilon"] == round(private["epsilon"], 6)  # study.json rounds to 6 places
    table = _privacy_spent_table(
        json_safe({"privacy_spent": {"hospital-a": spent}})
    )  # as study.json holds it
    assert [c.text for c in table.rows[0][1:3]] == ["unbounded"] * 2


def test_the_centralized_reference_is_written_to_every_sites_ledger_as_unbounded(tmp_path):
    sites = {name: _site(tmp_path / name, AugmentConfig()) for name in ("hospital-a", "hospital-b")}

    study_id = record_pooled_release(StudyConfig(name="pooled"), sites, steps=12)

    spent = privacy_spent(sites, {study_id})
    assert all(s["study_epsilon"] == s["site_total_epsilon"] == "unbounded" for s in spent.values())
    assert privacy_spent(sites, {"another-study"})["hospital-a"]["study_epsilon"] == 0.0


def test_a_site_without_a_ledger_is_reported_as_its_policy_allows(tmp_path):
    """No state_dir: nothing private can have been trained; a site that allows training without DP may
    have been, so its epsilon is unbounded, one that requires DP has spent nothing."""
    plain, strict = _site(tmp_path, AugmentConfig()), _site(tmp_path, AugmentConfig())
    plain.state_dir = strict.state_dir = ""
    strict.privacy.required = True

    spent = privacy_spent({"plain": plain, "strict": strict}, {"any"})

    assert spent["plain"]["study_epsilon"] == spent["plain"]["site_total_epsilon"] == "unbounded"
    assert spent["strict"]["study_epsilon"] == spent["strict"]["site_total_epsilon"] == 0.0
