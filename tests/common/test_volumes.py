"""Volumes: a DICOM series read from shuffled files comes out in slice order with its spacing; a series
with a missing slice, two orientations, uneven gaps or two series is refused, naming the folder and why;
NIfTI volumes are resampled to the study's spacing with MONAI; a folder site of series trains; a 3-D
network trains under DP-SGD and the round is accounted like any other."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from client.ledger import SiteAccountant
from client.site import SiteRuntime
from common.keys import Met
from common.privacy import request_config
from common.readers import BadImageFileError, read_dicom_series
from common.readers.volume import NiftiVolumeReader
from common.schema import PrivacyConfig, SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig
from common.sources import scan_site
from common.transforms import build_transforms
from tests.common.test_sources import with_study_header, write_dicom
from tests.plans import round_config

CT_SERIES = "98892001/CT5N"  # pydicom-data: a 5-slice CT series, 2.5 mm apart


def _ct_series(tmp_path, rng=None) -> list:
    """pydicom-data's CT series copied under random names, in a random order."""
    source = sorted((_data_root() / CT_SERIES).iterdir())
    rng = rng or np.random.default_rng(0)
    folder = tmp_path / "ct"
    folder.mkdir()
    for i in rng.permutation(len(source)):
        shutil.copy(source[i], folder / f"x{rng.integers(1e9)}.dcm")
    return sorted(folder.iterdir())


def _data_root():
    from pathlib import Path

    return Path(get_testdata_file("DICOMDIR")).parent


def _series(folder, positions, *, orientation=(1, 0, 0, 0, 1, 0), series_uid=None) -> None:
    """Slices whose pixel value is their index along z, written under shuffled names."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or pydicom.uid.generate_uid()
    for k, z in enumerate(positions):
        name = f"{uid[-6:]}-{(7 * k) % len(positions)}-{k}.dcm"  # names not in slice order
        path = write_dicom(folder / name, np.full((8, 8), (k + 1) / 10), patient_id="P1")
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.Modality = uid, "CT"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(z)], list(orientation)
        ds.PixelSpacing = [0.7, 0.7]
        ds.save_as(path)


def test_a_shuffled_series_comes_out_in_slice_order_with_its_spacing(tmp_path):
    positions = [40.0, 0.0, 20.0, 10.0, 30.0]  # slice k (pixel value (k + 1) / 10) lies at positions[k]
    _series(tmp_path / "gen", positions)
    voxels, spacing, _ = read_dicom_series(tmp_path / "gen")
    assert voxels.shape == (5, 8, 8) and spacing == (10.0, 0.7, 0.7)
    by_position = [(k + 1) / 10 for k in np.argsort(positions)]  # the values, in the order of z
    assert list(np.argsort(voxels.mean(axis=(1, 2)))) == list(np.argsort(by_position))

    _ct_series(tmp_path)
    real, spacing, first = read_dicom_series(tmp_path / "ct")
    z = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in (tmp_path / "ct").iterdir())
    assert real.shape == (5, 16, 16) and spacing[0] == pytest.approx(2.5) and first.Modality == "CT"
    assert float(first.ImagePositionPatient[2]) == pytest.approx(z[0])


@pytest.mark.parametrize(
    ("positions", "orientation", "problem"),
    [
        ([0, 1, 2, 4, 5], None, "missing slice"),
        ([0, 1, 2.3, 3.3], None, "uneven spacing"),
        ([0, 1, 1, 2], None, "duplicate slice"),
        ([0, 1, 2], (0, 1, 0, 0, 0, -1), "mixed orientation"),
    ],
)
def test_a_series_that_is_not_one_regular_volume_is_refused_naming_why(
    tmp_path, positions, orientation, problem
):
    _series(tmp_path / "s", positions)
    if orientation:  # one slice turned to another orientation
        path = sorted((tmp_path / "s").iterdir())[0]
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = list(orientation)
        ds.save_as(path)
    with pytest.raises(BadImageFileError) as err:
        read_dicom_series(tmp_path / "s")
    assert err.value.problem == problem and str(tmp_path / "s") in str(err.value)


def test_two_series_in_one_folder_and_a_missing_real_slice_are_refused(tmp_path):
    files = _ct_series(tmp_path)
    by_z = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_z[2].unlink()  # the middle slice
    with pytest.raises(BadImageFileError, match="a slice is missing between") as err:
        read_dicom_series(tmp_path / "ct")
    assert err.value.problem == "missing slice"
    _series(tmp_path / "two", [0, 1, 2])
    _series(tmp_path / "two", [5, 6, 7])
    with pytest.raises(BadImageFileError) as err:
        read_dicom_series(tmp_path / "two")
    assert err.value.problem == "several series"


def test_a_nifti_volume_is_resampled_to_the_studys_spacing(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(0).random((20, 24, 10)).astype(np.float32)  # x, y, z: 10 slices of 3 mm
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "v.nii.gz")
    image = NiftiVolumeReader().read(tmp_path / "v.nii.gz")
    assert image.pixels.shape == (10, 24, 20) and image.voxel_spacing == (3.0, 1.0, 1.0)
    site = SiteDataConfig(format="nifti", volume=True)
    site.preprocess.size, site.preprocess.spacing = [], [1.5, 2.0, 2.0]
    out = build_transforms(site)({"image": str(tmp_path / "v.nii.gz")})
    assert tuple(out["image"].shape) == (1, 20, 12, 10)  # 10 x 3 mm -> 20 x 1.5 mm; 24 x 1 mm -> 12 x 2 mm
    site.preprocess.size = [16, 16, 16]
    assert tuple(build_transforms(site)({"image": str(tmp_path / "v.nii.gz")})["image"].shape) == (
        1,
        16,
        16,
        16,
    )


def test_a_folder_site_of_series_loads_volumes_and_names_a_broken_one(tmp_path):
    root = tmp_path / "export"
    lines = ["file,patient_id,label"]
    for i in range(6):
        _series(root / f"p{i}" / "ct", [0, 2, 4, 6])
        lines.append(f"p{i}/ct,P{i},{['normal', 'finding'][i % 2]}")
    _series(root / "broken" / "ct", [0, 2, 6, 8])  # slice 4 missing
    lines.append("broken/ct,P9,normal")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    data = SiteDataConfig(format="dicom", volume=True, root=str(root), labels=str(tmp_path / "labels.csv"),
                          classes=["normal", "finding"], split_fractions=[0.5, 0.0, 0.5])  # fmt: skip
    data.preprocess.size = [4, 8, 8]
    report = scan_site(SiteConfig(site="a", data=data))
    assert report.images.shape == (6, 1, 4, 8, 8)
    assert [(b.file, b.problem) for b in report.bad] == [("broken/ct", "missing slice")]
    assert {s.orig_size for s in report.samples} == {(4, 8, 8)} and report.samples[0].spacing == (
        2.0,
        0.7,
        0.7,
    )


def test_a_3d_network_trains_under_dp_sgd_and_is_accounted(tmp_path):
    data = SiteDataConfig(
        format="synthetic",
        synthetic=SyntheticConfig(train_per_site=24, test_per_site=8, depth=8, image_size=16),
    )
    site = SiteRuntime.load(
        SiteConfig(site="a", data=data, privacy=SitePolicyConfig(max_epsilon=50), state_dir=str(tmp_path))
    )
    assert site.data.train_x.shape[1:] == (1, 8, 16, 16)
    config = round_config(model="cnn3d", dp_enabled=True, batch_size=8, size=(8, 16, 16))
    config |= request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0))
    from common.models import build_model

    reply = site.train(config, build_model("cnn3d").state_dict())
    assert not reply.refused and reply.metrics[Met.EPSILON] > 0
    assert all(torch.isfinite(w).all() for w in reply.weights.values())
    kinds = [e.kind for e in SiteAccountant(str(tmp_path)).ledger.entries()]
    assert kinds == ["count", "train"]
    refused = site.train(
        round_config(model="cnn28", dp_enabled=True, batch_size=8)
        | request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0)),
        build_model("cnn28").state_dict(),
    )
    assert "model is 2-D; this site's images are volumes" in refused.refused


def test_fedward_predict_takes_series_folders_and_nifti_volumes(tmp_path):
    import csv

    import nibabel as nib

    from client.predict import predict
    from common.models import build_model
    from common.package import write_package

    meta = {"model": "cnn3d", "in_channels": 1, "classes": ["normal", "finding"],
            "input": {"volume": True, "format": "dicom", "preprocess": {"size": [4, 8, 8], "spatial": "resize"}}}  # fmt: skip
    package = write_package(tmp_path / "model", build_model("cnn3d"), meta)
    _series(tmp_path / "in" / "patient1" / "ct", [0, 2, 4, 6])
    _series(tmp_path / "in" / "patient2" / "ct", [0, 2, 6, 8])  # a slice missing
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 6)).astype(np.float32), np.eye(4)),
        tmp_path / "in" / "v.nii.gz",
    )
    rows = {
        r["file"].split("/in/")[1]: r
        for r in csv.DictReader(open(predict(package, tmp_path / "in", tmp_path / "out")))
    }

    assert set(rows) == {"patient1/ct", "patient2/ct", "v.nii.gz"}
    for good in ("patient1/ct", "v.nii.gz"):
        assert (
            abs(float(rows[good]["p_normal"]) + float(rows[good]["p_finding"]) - 1) < 1e-5
            and not rows[good]["error"]
        )
    assert "a slice is missing" in rows["patient2/ct"]["error"] and not rows["patient2/ct"]["p_normal"]


def test_nibabels_own_nifti_files_read_as_volumes_with_their_spacing():
    import os

    import nibabel as nib
    from nibabel.testing import data_path

    anatomical = NiftiVolumeReader().read(os.path.join(data_path, "anatomical.nii"))
    assert anatomical.pixels.shape == (25, 41, 33) and anatomical.voxel_spacing == (2.0, 2.0, 2.0)
    standard = NiftiVolumeReader().read(os.path.join(data_path, "standard.nii.gz"))  # voxels 1 x 3 x 2 mm
    canonical = nib.as_closest_canonical(nib.load(os.path.join(data_path, "standard.nii.gz")))
    x, y, z = canonical.header.get_zooms()[:3]
    assert (
        standard.voxel_spacing == (float(z), float(y), float(x))
        and standard.pixels.shape == canonical.shape[::-1]
    )
    assert 0.0 <= standard.pixels.min() and standard.pixels.max() == 1.0


def test_site_check_reports_volumes_their_spacing_and_a_broken_series(tmp_path):
    from tests.conftest import run_fedward

    root, lines = tmp_path / "export", ["file,patient_id,label"]
    for i in range(4):
        _series(root / f"p{i}" / "ct", [0, 2, 4, 6])
        lines.append(f"p{i}/ct,P{i},{['normal', 'finding'][i % 2]}")
    _series(root / "broken" / "ct", [0, 2, 6, 8])
    lines.append("broken/ct,P9,normal")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "site.yaml").write_text(
        "site: vol\ndata: {format: dicom, volume: true, root: export, labels: labels.csv, classes: [normal, finding], "
        "split_fractions: [0.5, 0.0, 0.5], preprocess: {size: [4, 8, 8]}}\n"
    )
    proc = run_fedward("site", "check", str(tmp_path / "site.yaml"), timeout=120)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for words in (
        "slices per volume │ 4 (4)",
        "2 x 0.7 x 0.7 mm (4)",
        "4x8x8 (4)",
        "broken/ct",
        "missing slice",
        "usable: 4 images; 1 skipped",
    ):
        assert words in out, (words, proc.stdout)


def _series_for_seg(folder, positions, patient="P1"):
    """A CT series highdicom can segment: one study, frame of reference, spacing and thickness."""
    import highdicom as hd

    _series(folder, positions)
    study, frame = hd.UID(), hd.UID()
    slices = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SliceThickness, ds.PatientID = (
            study,
            frame,
            2.0,
            patient,
        )
        with_study_header(ds).save_as(path)
        slices.append(ds)
    return slices


def test_dicom_seg_masks_land_on_the_right_slices_of_a_shuffled_series(tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rng = np.random.default_rng(0)
    root, lines = tmp_path / "export", ["file,patient_id,mask"]
    for i in range(4):
        slices = _series_for_seg(root / f"p{i}" / "ct", [0, 2, 4, 6], patient=f"P{i}")
        order = list(rng.permutation(len(slices)))  # the SEG's frames in an order of their own
        frames = np.zeros((4, 8, 8), np.uint8)
        by_z = np.argsort([float(s.ImagePositionPatient[2]) for s in slices])  # slice indices, lowest z first
        frames[order.index(int(by_z[i % 4])), 2:5, 2:5] = 1  # the lesion on the slice at z = 2 * (i % 4)
        description = hd.seg.SegmentDescription(
            segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )  # fmt: skip
        seg = hd.seg.Segmentation(
            source_images=[slices[k] for k in order], pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="0",
        )  # fmt: skip
        seg.save_as(root / f"p{i}" / "seg.dcm")
        lines.append(f"p{i}/ct,P{i},p{i}/seg.dcm")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    data = SiteDataConfig(format="dicom", volume=True, root=str(root), labels=str(tmp_path / "labels.csv"),
                          classes=["background", "lesion"], split_fractions=[0.5, 0.0, 0.5])  # fmt: skip
    data.preprocess.size = [4, 8, 8]
    report = scan_site(SiteConfig(site="a", data=data))
    assert not report.bad, report.bad
    for sample, mask in zip(report.samples, report.masks, strict=True):
        i = int(sample.patient_id[1:])
        assert mask.shape == (4, 8, 8) and mask.sum() == 9
        assert int(mask.sum(dim=(1, 2)).argmax()) == i % 4  # the slice at z = 2 * (i % 4), in slice order
