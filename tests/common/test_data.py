"""Site data: partitions cover the official splits exactly, skew and shift behave as documented."""

import numpy as np
import pytest
import torch

from common.data import load_site_data
from common.medmnist import load_npz
from common.schema import StudyConfig
from common.simulated import simulated_sites
from common.sitedata import SiteDataError


def _study(medmnist_dir, **partition) -> StudyConfig:
    s = StudyConfig()
    s.data.source, s.data.dataset, s.data.data_dir = "medmnist", "pneumoniamnist", str(medmnist_dir)
    for k, v in partition.items():
        setattr(s.data.partition, k, v)
    return s


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
def test_sites_partition_the_official_splits_exactly(medmnist_dir, scheme):
    study = _study(medmnist_dir, scheme=scheme, alpha=0.5)
    sites = [load_site_data(c) for c in simulated_sites(study)]
    npz = load_npz(str(medmnist_dir / "pneumoniamnist.npz"))
    assert sum(len(d.test_y) for d in sites) == len(npz["test_labels"]) == 624
    assert sum(len(d.train_y) for d in sites) == len(npz["train_labels"]) == 4708
    pooled = np.sort(np.concatenate([d.test_x.numpy().reshape(len(d.test_y), -1).sum(1) for d in sites]))
    official = np.sort(npz["test_images"].reshape(624, -1).astype(np.float32).sum(1) / 255.0)
    np.testing.assert_allclose(pooled, official, rtol=1e-5)


def test_label_skew_applies_the_same_class_shares_to_train_and_test(medmnist_dir):
    sites = [load_site_data(c) for c in simulated_sites(_study(medmnist_dir, scheme="label_skew", alpha=0.3))]
    train_share = np.array([[(d.train_y == c).sum() for d in sites] for c in (0, 1)], dtype=float)
    test_share = np.array([[(d.test_y == c).sum() for d in sites] for c in (0, 1)], dtype=float)
    train_share /= train_share.sum(1, keepdims=True)
    test_share /= test_share.sum(1, keepdims=True)
    np.testing.assert_allclose(train_share, test_share, atol=0.02)
    assert train_share.std(axis=1).max() > 0.1  # the sites really differ


def test_min_test_per_class_redraws_until_every_site_can_measure_auc(medmnist_dir):
    def smallest_test_class(**kw):
        sites = [load_site_data(c) for c in simulated_sites(_study(medmnist_dir, scheme="label_skew", **kw))]
        assert sum(len(d.test_y) for d in sites) == 624  # still an exact partition
        return min(int((d.test_y == c).sum()) for d in sites for c in (0, 1))

    assert smallest_test_class(alpha=0.5) < 10  # the first draw for seed 0 leaves a site 4 positives
    assert smallest_test_class(alpha=0.5, min_test_per_class=20) >= 20
    with pytest.raises(SiteDataError, match=r"alpha=0\.5.*300 test images of every class.*raise alpha"):
        smallest_test_class(alpha=0.5, min_test_per_class=300)


def test_acquisition_shift_changes_train_and_test_alike_and_is_deterministic(medmnist_dir):
    plain = [load_site_data(c) for c in simulated_sites(_study(medmnist_dir))]
    shifted = [load_site_data(c) for c in simulated_sites(_study(medmnist_dir, acquisition_shift=True))]
    again = load_site_data(simulated_sites(_study(medmnist_dir, acquisition_shift=True))[1])
    assert np.array_equal(again.test_x.numpy(), shifted[1].test_x.numpy())
    for p, s in zip(plain[1:], shifted[1:], strict=True):
        train_gap = float((s.train_x - p.train_x).abs().mean())
        test_gap = float((s.test_x - p.test_x).abs().mean())
        assert train_gap > 0.02 and test_gap == pytest.approx(train_gap, rel=0.3)


def test_synthetic_sites_differ_in_acquisition_and_prevalence():
    study = StudyConfig()
    sites = [load_site_data(c) for c in simulated_sites(study)]
    prevalence = [float(d.train_y.float().mean()) for d in sites]
    brightness = [float(d.train_x.mean()) for d in sites]
    assert max(prevalence) - min(prevalence) > 0.2
    assert max(brightness) - min(brightness) > 0.05
    assert all(d.train_x.shape[1:] == (1, 28, 28) for d in sites)


@pytest.mark.parametrize("source", ["synthetic", "medmnist"])
def test_per_image_standardization_removes_the_scanners_gain_and_offset(medmnist_dir, source):
    """data.normalize: zscore for simulated sites: every image to mean 0, sd 1, so the sites' scanners
    no longer differ in brightness (their blur, noise and gamma remain)."""

    def sites(normalize: str) -> list:
        study = _study(medmnist_dir, acquisition_shift=True) if source == "medmnist" else StudyConfig()
        study.data.normalize = normalize
        return [load_site_data(c) for c in simulated_sites(study)]

    def per_site_brightness(data) -> list[float]:
        return [float(d.train_x.mean()) for d in data]

    raw, standardized = sites("none"), sites("zscore")
    assert max(per_site_brightness(raw)) - min(per_site_brightness(raw)) > 0.02  # the scanners differ
    for d in standardized:
        x = d.train_x.reshape(len(d.train_x), -1)
        assert torch.allclose(x.mean(1), torch.zeros(len(x)), atol=1e-4)
        assert torch.allclose(x.std(1, unbiased=False), torch.ones(len(x)), atol=1e-3)
    assert [len(d.test_y) for d in standardized] == [len(d.test_y) for d in raw]  # same images, same split


def test_a_study_over_site_configs_leaves_standardization_to_each_site(tmp_path):
    from common.config import ConfigError, load_study

    site = tmp_path / "a.yaml"
    site.write_text("site: a\n")
    study = tmp_path / "study.yaml"
    study.write_text(
        f"classes: [n, p]\nmin_sites: 1\ndata: {{source: sites, site_configs: [{site}], normalize: zscore}}\n"
    )
    with pytest.raises(ConfigError, match=r"data\.normalize.*data\.preprocess\.normalize"):
        load_study(study)
