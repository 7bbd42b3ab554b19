"""Tests for common/transforms.py: the reading settings (frame, window), the preprocessing the site
config asks for, one file through the pipeline, and the random augmentation.

The DICOM files are written with tests/common/test_sources.py's helpers.

    pytest tests/common/test_transforms.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_site
from common.schema import SiteDataConfig
from common.sources import scan_site
from common.transforms import augment_fn, build_transforms
from tests.common.test_sources import write_dicom, write_dicom_site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return write_dicom_site(tmp_path_factory.mktemp("site"), patients=4, bad_files=False)


# ------------------------------------------------------------------------- reading options


def preprocess(path: Path, data: SiteDataConfig) -> torch.Tensor:
    """One file through the site's pipeline, as the model sees it: C x H x W."""
    return torch.as_tensor(build_transforms(data)({"image": str(path)})["image"])


def _data(**pre) -> SiteDataConfig:
    data = SiteDataConfig(format="dicom")
    for key, value in pre.items():
        setattr(data.preprocess, key, value)
    return data


def test_frame_and_window_settings_choose_what_is_read(tmp_path):
    frames = np.stack([np.full((8, 8), v) for v in (0.1, 0.5, 0.9)])
    path = write_dicom(tmp_path / "multi.dcm", frames, patient_id="P")
    data = _data(size=[])
    means = {}
    for frame in ("first", "middle", "last", 1):
        data.frame = frame
        means[frame] = float(preprocess(path, data).mean())
    assert means["first"] == pytest.approx(0.1, abs=1e-3) and means["last"] == pytest.approx(0.9, abs=1e-3)
    assert means["middle"] == means[1] == pytest.approx(0.5, abs=1e-3)
    data.frame, data.window = "middle", [2048, 2048]  # stored 2047.5 -> 0.5 in the window of 1024..3072
    assert float(preprocess(path, data).mean()) == pytest.approx(0.5, abs=2e-3)
    data.window = [1024, 1024]  # 512..1536: stored 2048 is above it, so white
    assert float(preprocess(path, data).mean()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ preprocessing


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A 40 x 80 image: left half dark, right half bright, one very bright pixel."""
    img = np.full((40, 80), 0.2)
    img[:, 40:] = 0.6
    img[0, 0] = 1.0
    return write_dicom(tmp_path_factory.mktemp("wide") / "wide.dcm", img, patient_id="W")


def test_normalization_choices(wide):
    z = preprocess(wide, _data(size=[], normalize="zscore"))
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-5) and float(z.std(unbiased=False)) == pytest.approx(
        1.0, abs=1e-4
    )
    m = preprocess(wide, _data(size=[], normalize="minmax", percentiles=[1, 99]))
    assert float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)
    assert float(m[0, 0, 0]) == pytest.approx(1.0)  # the outlier is clipped to the 99th percentile ...
    assert float(m[0, 5, 60]) == pytest.approx(1.0)  # ... which is the bright half
    raw = preprocess(wide, _data(size=[]))
    assert float(raw[0, 5, 5]) == pytest.approx(0.2, abs=1e-3)  # none: the window's [0, 1] values


def test_size_choices_and_channels(wide):
    stretched = preprocess(wide, _data(size=[32, 32], spatial="resize"))
    fitted = preprocess(wide, _data(size=[32, 32], spatial="fit"))
    cropped = preprocess(wide, _data(size=[32, 32], spatial="crop_or_pad", channels=3))
    assert stretched.shape == fitted.shape == (1, 32, 32) and cropped.shape == (3, 32, 32)
    assert float(stretched[0, :, :16].mean()) == pytest.approx(0.2, abs=0.02)  # whole width kept
    assert float(fitted[0, :8].abs().max()) == 0.0 and float(fitted[0, 8:24].mean()) > 0.3  # 16 rows, padded
    assert float(cropped[0, 5, 5]) == pytest.approx(0.2, abs=1e-3) and float(
        cropped[0, 5, 20]
    ) == pytest.approx(0.6, abs=1e-3)
    assert torch.equal(cropped[0], cropped[2])


def test_one_file_through_the_pipeline_is_what_the_scan_cached(site):
    config = load_site(site)
    report = scan_site(config)
    sample = report.samples[3]
    item = build_transforms(config.data)({"image": str(report.root / sample.file)})
    assert torch.equal(torch.as_tensor(item["image"]), report.images[3])
    assert (item["modality"], tuple(item["orig_size"]), item["sha1"]) == (
        sample.modality,
        sample.orig_size,
        sample.sha1,
    )


# ------------------------------------------------------------------------------- augmentation


def test_augmentation_is_off_by_default_and_follows_the_config():
    data = SiteDataConfig(format="dicom")
    assert augment_fn(data) is None
    x = torch.rand(6, 1, 16, 16)
    data.augment.flip, data.augment.prob = [1], 1.0
    flip = augment_fn(data)
    assert torch.equal(flip(x, torch.Generator().manual_seed(0)), x.flip(-1))

    data.augment.rotate_deg, data.augment.zoom, data.augment.intensity, data.augment.noise_std = (
        15,
        [0.9, 1.1],
        0.1,
        0.05,
    )
    data.augment.prob = 0.5
    augment = augment_fn(data)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype and type(a) is torch.Tensor
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - x).abs().mean()) > 0.01
    assert augment(x[:0], torch.Generator()).shape == (0, 1, 16, 16)
