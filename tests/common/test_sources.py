"""Tests for common/sources.py: a hospital's folder of DICOM (and PNG, NIfTI) files with a label
sheet becomes site data; bad files are reported, not dropped silently; splits are by patient; the
cache works, also for site configs that share a state_dir; the data settings are checked.

The DICOM sites are written here with pydicom (plus some of pydicom's own test files, copied in);
the readers are tested in test_readers.py, label sheets in test_labels.py, the pipeline and the
augmentation in test_transforms.py.

    pytest tests/common/test_sources.py -q
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.config import ConfigError, load_site
from common.data import load_site_data
from common.schema import SiteConfig, SiteDataConfig
from common.sitedata import SiteDataError
from common.sources import scan_site
from common.transforms import augment_fn

CLASSES = ["normal", "pneumonia"]


# ------------------------------------------------------------------------------ a generated site


def write_dicom(
    path: Path,
    image: np.ndarray,
    *,
    patient_id: str,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    sop_class: str = pydicom.uid.ComputedRadiographyImageStorage,
) -> Path:
    """A conformant uint16 DICOM image of `image` (values in [0, 1]; frames first if 3-D), with a
    window covering the full range, so read_dicom gives `image` back to 1/4095."""
    stored = np.rint(np.asarray(image) * 4095).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = 4095 - stored  # displayed (inverted) it is `image` again
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.2]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def with_study_header(ds: Dataset, *, patient_name: str = "X^Y", accession: str = "A") -> Dataset:
    """The patient and study attributes a DICOM report, Secondary Capture or SEG copies from its source
    (write_dicom's files have none of them)."""
    ds.PatientName, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = (
        patient_name, "20260101", "120000", accession, "1",
    )  # fmt: skip
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex, ds.SeriesNumber, ds.InstanceNumber = (
        "", "", "O", 1, 1,
    )  # fmt: skip
    return ds


def chest(label: int, size: int, rng: np.random.Generator, contrast: float = 0.35) -> np.ndarray:
    """A soft 'lung field'; pneumonia (label 1) adds a bright patch of `contrast` (noise sd 0.03)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = (
        0.3
        + 0.3 * np.exp(-(((yy - 0.5) / 0.35) ** 2 + ((xx - 0.5) / 0.3) ** 2))
        + rng.normal(0, 0.03, (size, size))
    )
    if label:
        cy, cx = rng.uniform(0.3, 0.7, 2)
        img += contrast * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.08**2))
    return np.clip(img, 0, 1)


def write_bad_files(
    root: Path, good: Path, size: int, rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    """The bad files of write_dicom_site (see there) in `root`, and their label rows."""
    whole = good.read_bytes()
    (root / "bad").mkdir()
    (root / "bad/truncated.dcm").write_bytes(whole[: len(whole) - 700])
    (root / "bad/not_dicom.dcm").write_text("patient list exported by mistake\n")
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPClassUID, generate_uid()
    sr.Modality, sr.PatientID = "SR", "X900"
    sr.save_as(root / "bad/report.dcm", enforce_file_format=True)
    shutil.copy(good, root / "bad/copy_of_first.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "real_ct.dcm")
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), root / "real_mr_jpegls.dcm")
    write_dicom(root / "X901/img0.dcm", chest(0, size, rng), patient_id="X901")
    return [
        ("bad/truncated.dcm", "X900", "normal"),
        ("bad/not_dicom.dcm", "X900", "normal"),
        ("bad/report.dcm", "X900", "pneumonia"),
        ("bad/copy_of_first.dcm", "X902", CLASSES[0]),
        ("real_ct.dcm", "1CT1", "normal"),
        ("real_mr_jpegls.dcm", "4MR1", "pneumonia"),
        ("X901/img0.dcm", "X901", "covid"),  # not one of the site's classes
        ("gone/missing.dcm", "X903", "normal"),
    ]


def write_dicom_site(
    folder: Path,
    *,
    name: str = "hospital-a",
    patients: int = 12,
    per_patient: int = 2,
    size: int = 32,
    bad_files: bool = True,
    seed: int = 0,
    data: dict | None = None,
    privacy: dict | None = None,
    contrast: float = 0.35,
) -> Path:
    """A site as a hospital exports it: DICOM files in sub-folders, labels.csv, site.yaml
    (its `privacy` section when given: a hospital's own site config requires privacy by default).

    With bad_files: a truncated file, a text file named .dcm, a DICOM object without pixels,
    a row whose label is not a class, a row whose file is missing, a second copy of an image,
    and two of pydicom's real files (CT_small, and MR_small as JPEG-LS, which needs a plugin).
    Returns the site config's path; its state_dir is folder/state.
    """
    rng = np.random.default_rng(seed)
    root = folder / "export"
    rows = []
    for p in range(patients):
        pid = f"{name[-1].upper()}{p:03d}"
        label = p % 2
        for k in range(per_patient):
            rel = f"{pid}/img{k}.dcm"
            photometric = "MONOCHROME1" if (p + k) % 3 == 0 else "MONOCHROME2"
            write_dicom(
                root / rel, chest(label, size, rng, contrast), patient_id=pid, photometric=photometric
            )
            rows.append((rel, pid, CLASSES[label]))
    if bad_files:
        rows += write_bad_files(root, root / rows[0][0], size, rng)
    with (folder / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "patient_id", "label"])
        writer.writerows(rows)
    config = {
        "site": name,
        "data": {
            "format": "dicom",
            "root": "export",
            "labels": "labels.csv",
            "classes": CLASSES,
            "on_bad_file": "skip",
            "preprocess": {"size": [size, size]},
            **(data or {}),
        },
        "state_dir": str(folder / "state"),
        **({"privacy": privacy} if privacy else {}),
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


BAD = {
    "bad/truncated.dcm": "truncated",
    "bad/not_dicom.dcm": "not DICOM",
    "bad/report.dcm": "no pixel data",
    "bad/copy_of_first.dcm": "duplicate",
    "X901/img0.dcm": "unknown label",
    "gone/missing.dcm": "file not found",
}


def _jpegls_decodable() -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(pydicom.uid.JPEGLSLossless).is_available


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return write_dicom_site(tmp_path_factory.mktemp("site"))


# ----------------------------------------------------------------------------- loading and reporting


def test_dicom_site_skips_each_bad_file_and_says_why(site):
    report = scan_site(load_site(site))

    problems = {b.file: b.problem for b in report.bad}
    expected = dict(BAD)
    if not _jpegls_decodable():
        expected["real_mr_jpegls.dcm"] = "unsupported compression"
    assert problems == expected
    if "real_mr_jpegls.dcm" in problems:  # the report names the plugin that would decode it
        detail = next(b.detail for b in report.bad if b.file == "real_mr_jpegls.dcm")
        assert "pip install" in detail and "JPEG-LS" in detail
    assert report.usable and not report.fatal
    good = 12 * 2 + 1 + (0 if "real_mr_jpegls.dcm" in problems else 1)  # + the real CT
    assert len(report.samples) == good
    assert report.images is not None and report.images.shape == (good, 1, 32, 32)
    assert report.images.dtype == torch.float32
    ct = next(s for s in report.samples if s.file == "real_ct.dcm")
    assert (ct.modality, ct.orig_size, ct.file_patient_id) == ("CT", (128, 128), "1CT1")
    assert ct.spacing == pytest.approx((0.661468, 0.661468))


def test_site_data_holds_the_usable_images_split_by_patient(site):
    config = load_site(site)
    report = scan_site(config)
    data = load_site_data(config)

    n = {s: report.count(s) for s in ("train", "val", "test")}
    assert (len(data.train_y), len(data.test_y), len(data.val_y)) == (n["train"], n["test"], n["val"])
    assert data.train_x.shape[1:] == (1, 32, 32) and data.classes == CLASSES
    assert set(data.train_y.tolist()) == {0, 1}
    assert any("skipped 7" in note or "skipped 6" in note for note in data.notes)
    splits = {}
    for s in report.samples:
        splits.setdefault(s.patient_id, set()).add(s.split)
    assert all(len(v) == 1 for v in splits.values())  # no patient in two splits


def test_bad_files_are_logged_with_their_names(site, caplog):
    caplog.set_level("INFO", logger="fedward.site")
    load_site_data(load_site(site))
    text = caplog.text
    assert "bad file(s) or row(s) skipped" in text
    for name in BAD:
        assert name in text


def test_fail_policy_refuses_the_data_and_names_a_bad_file(tmp_path):
    path = write_dicom_site(tmp_path, patients=8, data={"on_bad_file": "fail"})
    config = load_site(path)
    with pytest.raises(SiteDataError, match=r"hospital-a.*(labels line|label sheet)"):
        load_site_data(config)
    # without the unknown label (which fails the sheet itself), the first bad file is named
    labels = tmp_path / "labels.csv"
    labels.write_text(labels.read_text().replace(",covid", ",normal"))
    report = scan_site(config)
    assert not report.usable and not report.fatal
    assert "bad/truncated.dcm" in report.reasons()[0] and "on_bad_file" in report.reasons()[0]


def test_same_seed_gives_the_same_split_and_another_seed_another(site, tmp_path):
    a = scan_site(load_site(site))
    b = scan_site(load_site(site))
    other = load_site(site)
    other.data.split_seed = 1
    c = scan_site(other)
    split = {s.file: s.split for s in a.samples}
    assert split == {s.file: s.split for s in b.samples}
    assert split != {s.file: s.split for s in c.samples}
    patients = {p: [s.split for s in a.samples if s.patient_id == p] for p in a.patients()}
    n_train = sum(1 for v in patients.values() if v[0] == "train")
    assert 0.5 <= n_train / len(patients) <= 0.85  # 0.7 of the patients, give or take rounding


def test_the_sites_own_split_column_is_used_and_conflicts_are_fatal(tmp_path):
    path = write_dicom_site(tmp_path, patients=6, bad_files=False)
    labels = tmp_path / "labels.csv"
    rows = list(csv.reader(labels.open()))
    own = ["test" if row[1] in ("A000", "A001") else "train" for row in rows[1:]]
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([[*rows[0], "split"], *[[*r, s] for r, s in zip(rows[1:], own, strict=True)]])
    report = scan_site(load_site(path))
    assert report.usable
    assert {s.patient_id for s in report.samples if s.split == "test"} == {"A000", "A001"}
    assert report.count("val") == 0

    rows = list(csv.reader(labels.open()))
    rows[1][3] = "val"  # A000's first image in val, its second in test
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    report = scan_site(load_site(path))
    assert report.split_conflicts == {"A000": ["test", "val"]}
    assert not report.usable and "more than one split" in report.fatal[0]


def test_rows_may_name_the_image_by_sop_instance_uid(tmp_path):
    path = write_dicom_site(tmp_path, patients=4, bad_files=False)
    labels = tmp_path / "labels.csv"
    rows = list(csv.reader(labels.open()))[1:]
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sop_instance_uid", "patient_id", "label"])
        for rel, pid, label in rows:
            writer.writerow([pydicom.dcmread(tmp_path / "export" / rel).SOPInstanceUID, pid, label])
        writer.writerow(["1.2.3.4.5", "A999", "normal"])
    report = scan_site(load_site(path))
    assert len(report.samples) == len(rows)
    assert [(b.file, b.problem) for b in report.bad] == [("1.2.3.4.5", "file not found")]
    by_file = {s.file: s.label for s in report.samples}
    assert by_file == {rel: label for rel, _, label in rows}


def test_rows_naming_files_outside_the_image_folder_are_bad_files(tmp_path):
    """The site service reads what the sheet names with its own rights: a row that points out of
    data.root (through '..', or an absolute path elsewhere) is a bad file; an absolute path inside the
    folder is its file."""
    path = write_dicom_site(tmp_path, patients=4, bad_files=False)
    labels, root = tmp_path / "labels.csv", tmp_path / "export"
    rows = list(csv.reader(labels.open()))[1:]
    outside = tmp_path / "elsewhere" / "secret.dcm"
    outside.parent.mkdir()
    outside.write_bytes((root / rows[0][0]).read_bytes())  # a real image: only its place is wrong
    rows[1] = (str(root / rows[1][0]), rows[1][1], rows[1][2])
    with labels.open("w", newline="") as f:  # one row by its absolute path inside the folder
        csv.writer(f).writerows([("file", "patient_id", "label"), *rows])
        csv.writer(f).writerows(
            [("../elsewhere/secret.dcm", "Z001", "normal"), (str(outside), "Z002", "normal")]
        )

    report = scan_site(load_site(path))

    assert sorted((b.file, b.problem) for b in report.bad) == [
        ("../elsewhere/secret.dcm", "outside the image folder"), (str(outside), "outside the image folder")
    ]  # fmt: skip
    assert len(report.samples) == len(rows)  # every row inside the folder, the absolute one too
    assert "data.root" in report.bad[0].detail


def test_missing_folder_and_broken_sheet_are_fatal(tmp_path):
    path = write_dicom_site(tmp_path, patients=2, bad_files=False)
    (tmp_path / "labels.csv").write_text("file,label\na.dcm,normal\n")
    report = scan_site(load_site(path))
    assert not report.usable and "patient_id" in report.fatal[0]
    shutil.rmtree(tmp_path / "export")
    report = scan_site(load_site(path))
    assert "does not exist" in report.fatal[0]


# ------------------------------------------------------------------------------------- cache


def test_a_second_load_comes_from_the_cache_and_changes_are_noticed(tmp_path):
    path = write_dicom_site(tmp_path, patients=4, bad_files=False)
    config = load_site(path)
    first = scan_site(config)
    second = scan_site(config)
    assert (first.decoded, first.from_cache) == (8, 0)
    assert (second.decoded, second.from_cache) == (0, 8)
    assert torch.equal(first.images, second.images)

    changed = tmp_path / "export/A001/img0.dcm"
    write_dicom(changed, np.zeros((32, 32)), patient_id="A001")
    os.utime(changed, ns=(1, 1))  # a new mtime, even on a coarse-clock file system
    third = scan_site(config)
    assert (third.decoded, third.from_cache) == (1, 7)
    i = next(i for i, s in enumerate(third.samples) if s.file == "A001/img0.dcm")
    assert float(third.images[i].abs().max()) == 0.0

    config.data.preprocess.size = [16, 16]  # other settings: every image again, old entries go
    fourth = scan_site(config)
    assert (fourth.decoded, fourth.from_cache) == (8, 0)
    assert fourth.images.shape[-2:] == (16, 16)
    assert len(list((tmp_path / "state/cache/images").glob("*.pt"))) == 8


def test_site_configs_sharing_a_state_dir_keep_each_others_cache(tmp_path):
    a = load_site(write_dicom_site(tmp_path / "a", name="hospital-a", patients=4, bad_files=False))
    b = load_site(write_dicom_site(tmp_path / "b", name="hospital-b", patients=3, bad_files=False))
    a.state_dir = b.state_dir = str(tmp_path / "shared")
    cache = tmp_path / "shared/cache/images"

    first_a = scan_site(a)
    of_a = set(cache.glob("*.pt"))
    first_b = scan_site(b)
    of_b = set(cache.glob("*.pt")) - of_a
    second_a = scan_site(a)

    assert (first_a.decoded, first_b.decoded, len(of_a), len(of_b)) == (8, 6, 8, 6)
    assert (second_a.decoded, second_a.from_cache) == (0, 8)  # B's scan removed none of A's

    (tmp_path / "a/export/A001/img0.dcm").unlink()  # A's export loses a file, its sheet the row
    labels = tmp_path / "a/labels.csv"
    labels.write_text("".join(x for x in labels.read_text().splitlines(True) if "A001/img0" not in x))
    third_a = scan_site(a)
    left = set(cache.glob("*.pt"))
    assert (third_a.decoded, third_a.from_cache, len(third_a.bad)) == (0, 7, 0)
    assert len(of_a - left) == 1 and of_b <= left  # the removed file's entry went, B's stayed
    assert scan_site(b).decoded == 0

    (tmp_path / "b/site.yaml").unlink()  # no site config needs B's entries any more
    scan_site(a)
    assert set(cache.glob("*.pt")) == left - of_b


def test_without_a_state_dir_nothing_is_cached(tmp_path):
    path = write_dicom_site(tmp_path, patients=2, bad_files=False)
    config = load_site(path)
    config.state_dir = ""
    assert scan_site(config).decoded == scan_site(config).decoded == 4
    assert not (tmp_path / "state").exists()


# ------------------------------------------------------------------------------ other formats


def test_png_and_nifti_sites_load_through_the_same_interface(tmp_path):
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    for fmt, suffix in (("image", ".png"), ("nifti", ".nii.gz")):
        folder = tmp_path / fmt
        (folder / "files").mkdir(parents=True)
        lines = ["file,patient_id,label"]
        for i in range(8):
            img = chest(i % 2, 24, rng)
            name = f"p{i}{suffix}"
            if fmt == "image":
                Image.fromarray(np.uint8(img * 255)).save(folder / "files" / name)
            else:
                volume = np.stack([img * 1000 - 500] * 3, axis=-1).astype(np.float32)
                nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "files" / name)
            lines.append(f"{name},P{i},{CLASSES[i % 2]}")
        (folder / "files" / f"broken{suffix}").write_bytes(b"\x89PNG\r\n")  # cut off after 6 bytes
        lines.append(f"broken{suffix},P9,normal")
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
        config = SiteConfig(
            site=fmt,
            data=SiteDataConfig(
                format=fmt, root=str(folder / "files"), labels=str(folder / "labels.csv"), classes=CLASSES
            ),
        )
        config.data.preprocess.size = [16, 16]
        config.data.split_fractions = [0.5, 0.0, 0.5]
        report = scan_site(config)
        assert [b.file for b in report.bad] == [f"broken{suffix}"], fmt
        assert report.images.shape == (8, 1, 16, 16), fmt
        assert 0.0 <= float(report.images.min()) and float(report.images.max()) <= 1.0 + 1e-6
        data = load_site_data(config)
        assert len(data.train_y) + len(data.test_y) == 8 and data.val_x is None


# ------------------------------------------------------------------------------------- config


def test_an_old_site_config_still_loads_with_the_defaults(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("site: a\ndata: {format: medmnist, path: x.npz}\n")
    site = load_site(path)
    assert site.data.frame == "middle" and site.data.split_fractions == [0.7, 0.15, 0.15]
    assert site.data.preprocess.size == [128, 128] and augment_fn(site.data) is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"window": [40]}, "data.window"),
        ({"format": "image", "window": [40, 400]}, "data.window"),
        ({"frame": "centre"}, "data.frame"),
        ({"split_fractions": [0.5, 0.5, 0.5]}, "data.split_fractions"),
        ({"preprocess": {"spatial": "squash"}}, "data.preprocess.spatial"),
        ({"preprocess": {"normalize": "l2"}}, "data.preprocess.normalize"),
        ({"preprocess": {"percentiles": [99, 1]}}, "data.preprocess.percentiles"),
        ({"preprocess": {"channels": 2}}, "data.preprocess.channels"),
        ({"augment": {"flip": [2]}}, "data.augment.flip"),
        ({"augment": {"zoom": [1.2, 0.8]}}, "data.augment.zoom"),
        ({"augment": {"noise_std": -1}}, "data.augment.noise_std"),
        ({"classes": ["normal"]}, "data.classes"),
        ({"labels": ""}, "data.labels"),
    ],
)
def test_bad_data_settings_are_named(tmp_path, data, key):
    config = {
        "site": "a",
        "data": {"format": "dicom", "root": "r", "labels": "l.csv", "classes": CLASSES, **data},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_site(path)


def test_the_example_site_config_loads(root):
    site = load_site(root / "configs/sites/example-dicom-site.yaml")
    assert site.data.format == "dicom" and site.data.classes == CLASSES
    assert augment_fn(site.data) is not None
