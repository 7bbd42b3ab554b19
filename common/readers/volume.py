"""3-D volumes (a site config's `data.volume: true`): a DICOM series in a folder, or a NIfTI file.

`DicomSeriesReader` reads a folder holding one series: every file's header (pydicom), grouped by
Series Instance UID, ordered by position along the slices' normal (Image Position and Orientation
Patient), the slice spacing measured from those positions, then each slice's pixels in modality
units (common.readers.dicom: HU for CT), one window for the whole volume (the site's `window`, else
the first slice's Window Center/Width, else the volume's min..max) to [0, 1]. A series that cannot
make one regular volume is refused, naming what is wrong (`BadImageFileError.problem`):

    several series      the folder holds more than one Series Instance UID
    mixed orientation   slices with different Image Orientation (Patient)
    duplicate slice     two slices at the same position
    missing slice       a gap of more than 1.5 x the series' usual slice spacing
    uneven spacing      slice gaps differing by more than 10% (no single spacing to resample from)

`NiftiVolumeReader` reads a whole NIfTI volume in the orientation `read_nifti` gives its slices
(closest RAS+, each slice laid out like a DICOM axial image), spacing from the header.

Volumes come out as float32 D x H x W in [0, 1], `voxel_spacing` (slice, row, column) in mm.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom

from common.readers.base import BadImageFileError, PathLike, ReadImage, SiteImageReader
from common.readers.dicom import read_dataset, read_dicom
from common.readers.nifti import load_ras

__all__ = ["DicomSeriesReader", "NiftiVolumeReader", "folder_files", "folder_sha1", "read_dicom_series"]

ORIENTATION_TOLERANCE = 1e-3  # direction cosines
GAP_FACTOR = 1.5  # a gap this many times the usual spacing: a slice is missing
EVEN_TOLERANCE = 0.10  # gaps within 10% of each other: one spacing


def folder_files(folder: PathLike) -> list[Path]:
    """The files of a series folder, sorted: hidden files and DICOMDIR left out."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )


def folder_sha1(folder: PathLike) -> str:
    """One SHA-1 over a series folder's files (names and bytes), to find the same series twice."""
    digest = hashlib.sha1()
    for p in folder_files(folder):
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


class DicomSeriesReader(SiteImageReader):
    """`format: dicom` with `volume: true`: each label-sheet `file` names a folder holding one series."""

    format = "dicom"
    suffixes = ()
    takes_folders = True

    def read(self, path: PathLike) -> ReadImage:
        headers: list = []
        voxels, spacing, first = read_dicom_series(path, window=self.window, headers_out=headers)
        return ReadImage(
            slice_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
            pixels=voxels,
            volume=True,
            modality=str(first.get("Modality", "")),
            patient_id=str(first.get("PatientID", "")),
            sop_instance_uid=str(first.get("SeriesInstanceUID", "")),  # the series: one sample
            pixel_spacing=spacing[1:],
            voxel_spacing=spacing,
            n_frames=voxels.shape[0],
        )


class NiftiVolumeReader(SiteImageReader):
    """`format: nifti` with `volume: true`: the whole volume of each .nii / .nii.gz file."""

    format = "nifti"
    suffixes = (".nii", ".nii.gz")

    def read(self, path: PathLike) -> ReadImage:
        ras, zooms = load_ras(path)
        # RAS x, y, z -> slices inferior->superior, rows anterior->posterior, columns right->left
        volume = np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 1, 0), dtype=np.float32)
        spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        return ReadImage(
            pixels=_to_unit(volume, self.window), volume=True, pixel_spacing=spacing[1:],
            voxel_spacing=spacing, n_frames=volume.shape[0],
        )  # fmt: skip


def read_dicom_series(
    folder: PathLike, *, window: tuple[float, float] | None = None, headers_out: list | None = None
) -> tuple[np.ndarray, tuple[float, float, float], pydicom.Dataset]:
    """A series folder as (D x H x W voxels in [0, 1], (slice, row, col) spacing in mm, first slice's
    header); BadImageFileError naming the folder and what is wrong (the module docstring). With
    `headers_out`, every slice's header is appended to it, in the volume's slice order."""
    folder = Path(folder)
    headers = []
    for p in folder_files(folder):  # each slice read once: its header orders it, its pixels fill it
        try:
            headers.append((p, read_dataset(p)))
        except BadImageFileError as err:
            raise BadImageFileError(folder, f"'{p.name}': {err.reason}", problem=err.problem,
                                    hint="A series folder holds the series' DICOM files only") from err  # fmt: skip
    if not headers:
        raise BadImageFileError(folder, "the series folder holds no files", problem="not DICOM")
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(uids) > 1:
        raise BadImageFileError(folder, f"it holds {len(uids)} series ({', '.join(uids)})", problem="several series",
                                hint="Give each series a folder of its own")  # fmt: skip
    ordered, spacing_z = _order(folder, headers)
    if headers_out is not None:
        headers_out.extend(ds for _, ds in ordered)
    values = np.stack([read_dicom(p, apply_voi=False, dataset=ds).pixels for p, ds in ordered]).astype(
        np.float64
    )
    first = ordered[0][1]
    if window is None and "WindowCenter" in first and "WindowWidth" in first:
        window = (_first(first.WindowCenter), _first(first.WindowWidth))
    row, col = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    return _to_unit(values, window), (spacing_z, row, col), first


def _first(value) -> float:
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def _order(folder: Path, headers: list) -> tuple[list, float]:
    """The slices ordered along their normal, and the slice spacing; refuses what is not one volume."""
    orientations = np.array([[float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
                             for _, ds in headers])  # fmt: skip
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise BadImageFileError(folder, "its slices have different orientations (Image Orientation Patient)",
                                problem="mixed orientation", hint="Keep one orientation per series folder")  # fmt: skip
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    if all("ImagePositionPatient" in ds for _, ds in headers):
        where = np.array([np.dot([float(v) for v in ds.ImagePositionPatient], normal) for _, ds in headers])
    else:  # no positions: Instance Number orders them; the spacing is the header's
        where = np.array([float(ds.get("InstanceNumber", i)) for i, (_, ds) in enumerate(headers)])
        where = where * float(
            headers[0][1].get("SpacingBetweenSlices", headers[0][1].get("SliceThickness", 1.0))
        )
    order = np.argsort(where, kind="stable")
    ordered, where = [headers[i] for i in order], where[order]
    if len(ordered) == 1:
        return ordered, float(ordered[0][1].get("SliceThickness", 1.0))
    gaps = np.diff(where)
    if np.min(gaps) < 1e-3:
        i = int(np.argmin(gaps))
        raise BadImageFileError(folder, f"'{ordered[i][0].name}' and '{ordered[i + 1][0].name}' lie at the same "
                                "position", problem="duplicate slice", hint="Remove the copy")  # fmt: skip
    usual = float(np.median(gaps))
    if np.max(gaps) > GAP_FACTOR * usual:
        i = int(np.argmax(gaps))
        raise BadImageFileError(
            folder, f"a slice is missing between '{ordered[i][0].name}' and '{ordered[i + 1][0].name}' (a gap of "
            f"{gaps[i]:.2f} mm where the series' slices are {usual:.2f} mm apart)", problem="missing slice",
            hint="Export the whole series again",
        )  # fmt: skip
    if (np.max(gaps) - np.min(gaps)) > EVEN_TOLERANCE * usual:
        raise BadImageFileError(folder, f"its slice gaps run from {np.min(gaps):.2f} to {np.max(gaps):.2f} mm",
                                problem="uneven spacing", hint="Resample it to even slices, or leave it out")  # fmt: skip
    return ordered, usual


def _to_unit(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Modality values to [0, 1]: through `window` (center, width), else the volume's own min..max."""
    if window is not None:
        center, width = window
        out = (values - (center - width / 2)) / width
    else:
        low, high = float(values.min()), float(values.max())
        out = np.zeros_like(values) if high == low else (values - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
