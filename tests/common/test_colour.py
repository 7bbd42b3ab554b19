"""Colour stays colour where the site asks for it: colour DICOM (RGB, YBR_FULL, YBR_FULL_422, palette
colour, from pydicom-data), colour PNG and colour MedMNIST-shaped files reach the model's first layer
with 3 channels; where a site reads grey, colour files become grey and the site says so; a grey file at
a colour site is a bad file, named. And the reason it matters: a finding only colour shows is learnt
from colour and not from grey."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from client.train import predict, train_round
from common.config import ConfigError, load_site
from common.data import load_site_data
from common.metrics import exact_auc
from common.models import build_model
from common.readers import read_dicom
from common.readers.base import luma
from common.schema import SiteConfig, SiteDataConfig
from common.sources import scan_site
from common.synthetic import synthetic_images_with_findings
from common.transforms import build_transforms
from tests.plans import plan


def test_colour_dicom_is_rgb_whatever_its_photometric_interpretation():
    rgb = read_dicom(get_testdata_file("SC_rgb.dcm"), colour=True).pixels
    assert rgb.shape == (100, 100, 3) and np.ptp(rgb, axis=2).max() > 0.5  # colour bands, not grey
    for ybr in ("SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        same = read_dicom(get_testdata_file(ybr), colour=True).pixels
        assert same.shape == rgb.shape and np.abs(same - rgb).mean() < 0.02, ybr  # pydicom's YBR -> RGB
    palette = read_dicom(get_testdata_file("OBXXXX1A.dcm"), colour=True)
    assert palette.pixels.shape == (600, 800, 3) and palette.is_colour
    grey = read_dicom(get_testdata_file("SC_rgb.dcm")).pixels  # the default: BT.601 luma
    assert grey.shape == (100, 100) and np.allclose(grey, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)


def test_a_colour_ultrasound_reaches_the_models_first_layer_in_colour():
    data = SiteDataConfig(format="dicom", colour="rgb")
    data.preprocess.size, data.preprocess.channels = [64, 64], 3
    sample = build_transforms(data)({"image": get_testdata_file("US1_UNCR.dcm")})
    x = torch.as_tensor(sample["image"])[None].float()
    assert x.shape == (1, 3, 64, 64) and sample["colour_file"]
    assert (x[0, 0] - x[0, 1]).abs().max() > 0.05  # the channels differ: colour, not grey repeated
    model = build_model("cnn28", in_channels=3)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 3 and model(x).shape == (1, 2)


def _png_site(tmp_path, colour: str) -> SiteConfig:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    rng, lines = np.random.default_rng(0), ["file,patient_id,label"]
    for i in range(8):
        rgb = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(files / f"c{i}.png")
        lines.append(f"c{i}.png,P{i},{['normal', 'finding'][i % 2]}")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(files / "grey.png")
    lines.append("grey.png,P9,normal")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "site.yaml").write_text(
        f"site: a\ndata: {{format: image, root: files, labels: labels.csv, classes: [normal, finding], "
        f"colour: {colour}, split_fractions: [0.5, 0.0, 0.5], preprocess: {{size: [16, 16], "
        f"channels: {3 if colour == 'rgb' else 1}}}}}\n"
    )
    return load_site(tmp_path / "site.yaml")


def test_a_colour_site_keeps_colour_and_names_a_grey_file(tmp_path):
    report = scan_site(_png_site(tmp_path, "rgb"))
    assert report.images.shape == (8, 3, 16, 16)
    assert [(b.file, b.problem) for b in report.bad] == [("grey.png", "not colour")]
    assert "data.colour: rgb" in report.bad[0].detail


def test_a_grey_site_reads_colour_files_grey_and_says_so(tmp_path):
    site = _png_site(tmp_path, "grey")
    report = scan_site(site)
    assert report.images.shape == (9, 1, 16, 16) and not report.bad
    assert any("8 colour file(s) read as grey" in note for note in load_site_data(site).notes)


def test_a_colour_site_config_must_give_the_model_three_channels(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "site: a\ndata: {format: image, root: f, labels: l.csv, classes: [a, b], colour: rgb}\n"
    )
    with pytest.raises(ConfigError, match="data.preprocess.channels: 3"):
        load_site(tmp_path / "site.yaml")


def test_a_colour_medmnist_file_keeps_its_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        for s, n in (("train", 40), ("test", 20))
    }
    arrays |= {f"{s}_labels": rng.integers(0, 2, (n, 1)) for s, n in (("train", 40), ("test", 20))}
    np.savez(tmp_path / "colourmnist.npz", **arrays)
    for colour, channels in (("rgb", 3), ("grey", 1)):
        site = SiteConfig(
            site="a",
            data=SiteDataConfig(format="medmnist", path=str(tmp_path / "colourmnist.npz"), colour=colour),
        )
        site.data.preprocess.channels = channels
        data = load_site_data(site)
        assert data.train_x.shape[1:] == (channels, 28, 28)
        first = torch.from_numpy(arrays["train_images"][0].transpose(2, 0, 1) / 255.0).float()
        expected = first if channels == 3 else torch.from_numpy(luma(first[None].numpy()))
        assert any(torch.allclose(x, expected, atol=1e-5) for x in data.train_x), (
            colour
        )  # one of its images, unchanged


def test_a_finding_only_colour_shows_is_learnt_in_colour_not_in_grey():
    rng = np.random.default_rng(0)
    x, y, _ = synthetic_images_with_findings(700, 0.5, 28, rng, colour=True)
    train, test = slice(0, 500), slice(500, None)
    aucs = {}
    for name, images in (("colour", x), ("grey", luma(x)[:, None])):
        model = build_model("cnn28", in_channels=images.shape[1], seed=0)
        round_plan = plan(in_channels=images.shape[1], local_epochs=8, batch_size=32, lr=0.003)
        train_round(model, torch.from_numpy(images[train]), torch.from_numpy(y[train]), round_plan)
        aucs[name] = exact_auc(y[test], predict(model, torch.from_numpy(images[test])))
    print(aucs)
    # the finding is isoluminant: colour makes it plain (AUC near 1), grey leaves chance (0.5) plus the
    # noise of 100 test images (an AUC sd of about 0.06)
    assert aucs["colour"] >= 0.9 and aucs["grey"] <= 0.65, f"colour should separate, grey should not: {aucs}"
