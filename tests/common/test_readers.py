"""Tests for common/readers/ on real DICOM files (pydicom's and pydicom-data's test files) and
files written here with pydicom, PIL and nibabel.

    pytest tests/common/test_readers.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_voi_lut, get_decoder
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.readers import (
    PROBLEMS,
    BadImageFileError,
    DicomReader,
    NiftiReader,
    RasterReader,
    ReadImage,
    read_dicom,
    read_image,
    read_nifti,
    reader_for,
)
from common.schema import SiteDataConfig

LUMA = np.array([0.299, 0.587, 0.114])


def data_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: pip install pydicom-data (the 'test' extra)"
    return str(path)


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    bits_stored: int = 12,
) -> Path:
    """A minimal conformant single-frame uint16 image written with pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "PAT-042"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.75]
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------- DICOM


def test_ct_comes_out_in_hounsfield_units():
    path = data_file("CT_small.dcm")
    ds = pydicom.dcmread(path)

    image = read_dicom(path, apply_voi=False)

    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (128, 128)
    np.testing.assert_array_equal(image.pixels, expected)
    assert float(ds.RescaleIntercept) == -1024.0
    assert image.modality == "CT"
    assert image.patient_id == "1CT1"
    assert image.sop_instance_uid == ds.SOPInstanceUID
    assert image.pixel_spacing == pytest.approx((0.661468, 0.661468))
    assert (image.rows, image.cols, image.n_frames, image.frame) == (128, 128, 1, 0)


def test_config_window_maps_center_minus_half_width_to_0_and_plus_half_width_to_1():
    path = data_file("CT_small.dcm")
    hu = read_dicom(path, apply_voi=False).pixels.astype(np.float64)

    shown = read_dicom(path, window=(40, 400)).pixels

    np.testing.assert_allclose(shown, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)
    assert shown.min() == 0.0 and shown.max() == 1.0


def test_window_from_the_file_matches_pydicom_windowing():
    path = data_file("MR_small.dcm")
    ds = pydicom.dcmread(path)

    shown = read_dicom(path).pixels

    assert (ds.BitsStored, ds.PixelRepresentation) == (16, 1)  # window output: -32768..32767
    windowed = apply_voi_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(shown, (windowed + 32768) / 65535, atol=1e-6)
    assert 0.0 <= shown.min() < shown.max() == 1.0


def test_monochrome1_is_inverted_so_high_is_bright():
    path = data_file("RG3_UNCR.dcm")  # CR, MONOCHROME1, window 550/1024 on 10 bits
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array

    shown = read_dicom(path).pixels
    raw = read_dicom(path, apply_voi=False).pixels

    expected = 1.0 - apply_voi_lut(stored, ds) / (2**ds.BitsStored - 1)
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    darkest, brightest = np.unravel_index(stored.argmax(), stored.shape), stored.argmin()
    assert shown[darkest] < shown.flat[brightest]
    np.testing.assert_array_equal(raw, 1023 - stored)  # mirrored in the 10-bit range


def test_written_monochrome1_without_window_is_inverted_min_max(tmp_path):
    stored = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")

    shown = read_dicom(path).pixels

    np.testing.assert_allclose(shown, [[1.0, 0.75], [0.5, 0.0]])


@pytest.mark.parametrize(("frame", "index"), [("first", 0), ("middle", 5), ("last", 9), (3, 3)])
def test_multi_frame_yields_the_configured_frame(frame, index):
    path = data_file("emri_small.dcm")  # MR, 10 frames of 64 x 64, no rescale
    frames = pydicom.dcmread(path).pixel_array

    image = read_dicom(path, frame=frame, apply_voi=False)

    assert image.n_frames == 10 and image.frame == index
    np.testing.assert_array_equal(image.pixels, frames[index])


def test_multi_frame_colour_ultrasound_yields_the_frame_as_luma():
    path = data_file("examples_ybr_color.dcm")  # US, 30 frames, YBR_FULL_422, JPEG baseline
    if not get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID).is_available:
        pytest.skip("no JPEG baseline decoder (Pillow is normally installed)")
    rgb = pydicom.dcmread(path).pixel_array[7]  # pydicom converts YBR to RGB

    image = read_dicom(path, frame=7)

    assert (image.modality, image.photometric, image.n_frames) == ("US", "YBR_FULL_422", 30)
    np.testing.assert_allclose(image.pixels, rgb @ LUMA / 255, atol=1e-5)


def test_palette_colour_is_looked_up_then_turned_to_luma():
    path = data_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)

    shown = read_dicom(path).pixels

    expected = apply_color_lut(ds.pixel_array, ds) @ LUMA / 65535  # 16-bit palette entries
    np.testing.assert_allclose(shown, expected, atol=1e-5)
    assert shown.shape == (350, 800)


def test_enhanced_ct_uses_the_functional_groups_of_the_frame():
    path = data_file("eCT_Supplemental.dcm")  # rescale and spacing only in functional groups
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds

    image = read_dicom(path, frame="last", apply_voi=False)

    np.testing.assert_array_equal(image.pixels, ds.pixel_array[1].astype(np.float64) - 1024)
    assert image.pixel_spacing == pytest.approx((0.388672, 0.388672))


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"],
)
def test_lossless_compressed_file_decodes_or_names_the_plugin(name):
    path = data_file(name)
    syntax = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    decoder = get_decoder(syntax)
    uncompressed = read_dicom(data_file("MR_small.dcm"), apply_voi=False).pixels

    if decoder.is_available:
        image = read_dicom(path, apply_voi=False)
        np.testing.assert_array_equal(image.pixels, uncompressed)
    else:
        with pytest.raises(BadImageFileError) as caught:
            read_dicom(path)
        message = str(caught.value)
        assert path in message and syntax.name in message
        assert "pylibjpeg" in message and "pip install" in message
        assert caught.value.problem == "unsupported compression"


def test_a_transfer_syntax_pydicom_has_no_decoder_for_is_unsupported_compression(tmp_path):
    path = write_dicom(tmp_path / "private.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # a private syntax
    ds.save_as(path)

    with pytest.raises(BadImageFileError, match="has no pixel data decoder") as caught:
        read_dicom(path)

    # the reason contains "has no pixel data", but the problem is the compression
    assert caught.value.problem == "unsupported compression"


def test_truncated_pixel_data_is_reported(tmp_path):
    src = Path(data_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(src[:20_000])  # inside the 32 KiB of pixel data

    with pytest.raises(BadImageFileError) as caught:
        read_dicom(path)

    assert caught.value.path == path
    assert str(path) in str(caught.value) and "truncated" in caught.value.reason
    assert caught.value.problem == "truncated"


@pytest.mark.parametrize("cut", [140, 1_000, 3_000])
def test_file_cut_before_the_pixel_data_is_reported_as_truncated(tmp_path, cut):
    path = tmp_path / "cut.dcm"
    path.write_bytes(Path(data_file("CT_small.dcm")).read_bytes()[:cut])

    with pytest.raises(BadImageFileError, match="truncated") as caught:
        read_dicom(path)

    assert str(path) in str(caught.value) and caught.value.problem == "truncated"


def test_non_dicom_file_is_rejected(tmp_path):
    from PIL import Image

    path = tmp_path / "scan.dcm"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")

    with pytest.raises(BadImageFileError) as caught:
        read_dicom(path)

    assert str(path) in str(caught.value) and "not a DICOM file" in caught.value.reason
    assert caught.value.problem == "not DICOM"


def test_dicom_without_pixel_data_names_what_it_is():
    path = data_file("rtplan.dcm")

    with pytest.raises(BadImageFileError, match="no pixel data") as caught:
        read_dicom(path)

    assert "RT Plan Storage" in caught.value.reason and caught.value.problem == "no pixel data"


def test_frame_out_of_range_says_how_many_frames_there_are():
    with pytest.raises(BadImageFileError, match="frame 10 is out of range.*10 frame") as caught:
        read_dicom(data_file("emri_small.dcm"), frame=10)

    assert caught.value.path.name == "emri_small.dcm"


def test_written_dicom_round_trips_with_rescale_and_window(tmp_path):
    stored = np.arange(4 * 6, dtype=np.uint16).reshape(4, 6) * 150  # up to 3450, 12 bits
    path = write_dicom(tmp_path / "rt.dcm", stored, slope=2.0, intercept=-1000.0, window=(500.0, 2000.0))

    image = read_dicom(path, apply_voi=False)
    shown = read_dicom(path).pixels

    hu = stored * 2.0 - 1000.0
    np.testing.assert_array_equal(image.pixels, hu)
    assert (image.rows, image.cols, image.patient_id) == (4, 6, "PAT-042")
    assert image.pixel_spacing == (0.5, 0.75)
    # DICOM LINEAR window: (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1]
    np.testing.assert_allclose(shown, np.clip((hu - 499.5) / 1999 + 0.5, 0, 1), atol=1e-6)


# ------------------------------------------------------------------------------ PNG, JPEG, NIfTI


def test_png_reads_as_gray_in_unit_range(tmp_path):
    from PIL import Image

    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    deep = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    Image.fromarray(deep).save(tmp_path / "deep.png")

    gray = read_image(tmp_path / "rgb.png")
    gray16 = read_image(tmp_path / "deep.png")

    assert gray.dtype == np.float32 and gray.shape == (3, 4)
    assert gray[0, 0] == pytest.approx(76 / 255)  # PIL's BT.601 luma of pure red
    assert gray[1, 1] == 1.0 and gray[2, 3] == 0.0
    np.testing.assert_allclose(gray16, deep / 65535, atol=1e-7)


def test_truncated_png_is_reported(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:200])

    with pytest.raises(BadImageFileError, match="bad.png") as caught:
        read_image(bad)

    assert caught.value.problem in PROBLEMS


def test_nifti_slice_is_laid_out_like_a_dicom_axial_image(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((4, 3, 5), np.float32)  # RAS: x left->right, y post->ant, z inf->sup
    volume[3, 0, 2] = 7.0  # the patient's right-most, posterior-most voxel of slice 2
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "ras.nii.gz")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # same anatomy stored with x and y reversed
    nib.save(nib.Nifti1Image(volume[::-1, ::-1, :].copy(), lps), tmp_path / "lps.nii.gz")

    ras = read_nifti(tmp_path / "ras.nii.gz")
    other = read_nifti(tmp_path / "lps.nii.gz", slice_index=2)

    assert ras.shape == (3, 4)  # rows anterior->posterior, columns patient right->left
    assert ras[2, 0] == 7.0 and ras.sum() == 7.0  # bottom row (posterior), left column (right)
    np.testing.assert_array_equal(ras, other)
    with pytest.raises(BadImageFileError, match="slice 5 is out of range"):
        read_nifti(tmp_path / "ras.nii.gz", slice_index=5)


# ------------------------------------------------------------------------------ the interface


@pytest.mark.parametrize(
    ("fmt", "cls", "takes", "refuses"),
    [
        ("dicom", DicomReader, ["IM0001", "a/b.DCM", "x.png"], []),
        ("image", RasterReader, ["a.png", "b.JPG", "c.jpeg"], ["d.dcm", "e.nii"]),
        ("nifti", NiftiReader, ["a.nii", "b.NII.GZ"], ["c.gz", "d.png"]),
    ],
)
def test_reader_for_gives_one_reader_per_format_that_knows_its_files(fmt, cls, takes, refuses):
    reader = reader_for(SiteDataConfig(format=fmt, frame="last"))

    assert type(reader) is cls and reader.format == fmt and reader.frame == "last"
    assert all(reader.verify_suffix(name) for name in takes)
    assert not any(reader.verify_suffix(name) for name in refuses)


def test_reader_for_refuses_a_format_without_files():
    with pytest.raises(ValueError, match="medmnist"):
        reader_for(SiteDataConfig(format="medmnist"))


def test_dicom_reader_gives_the_window_and_the_facts_of_the_file():
    path = data_file("CT_small.dcm")
    image = read_dicom(path, window=(40, 400))

    read = reader_for(SiteDataConfig(format="dicom", window=[40, 400])).read(path)

    assert isinstance(read, ReadImage)
    np.testing.assert_array_equal(read.pixels, image.pixels)
    assert (read.modality, read.patient_id, read.n_frames) == ("CT", "1CT1", 1)
    assert read.sop_instance_uid == image.sop_instance_uid
    assert read.pixel_spacing == pytest.approx((0.661468, 0.661468))


def test_nifti_reader_maps_the_slice_to_unit_range_by_window_or_min_max(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((2, 2, 3), np.float32)
    volume[:, :, 1] = [[-200.0, 0.0], [100.0, 300.0]]
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    stored = read_nifti(tmp_path / "v.nii.gz")

    by_range = NiftiReader().read(tmp_path / "v.nii.gz")
    by_window = NiftiReader(window=[0, 400]).read(tmp_path / "v.nii.gz")  # -200 -> 0, 200 -> 1

    np.testing.assert_allclose(by_range.pixels, (stored + 200) / 500)
    np.testing.assert_allclose(by_window.pixels, np.clip((stored + 200) / 400, 0, 1))
    assert by_range.pixels.dtype == by_window.pixels.dtype == np.float32
    assert (by_range.modality, by_range.pixel_spacing, by_range.n_frames) == ("", None, 1)


def test_png_reader_gives_the_image_and_no_facts(tmp_path):
    from PIL import Image

    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "a.png")

    read = RasterReader().read(tmp_path / "a.png")

    np.testing.assert_array_equal(read.pixels, [[0.0, 1.0]])
    assert (read.modality, read.patient_id, read.sop_instance_uid, read.pixel_spacing) == ("", "", "", None)
