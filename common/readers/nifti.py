"""NIfTI-1/2 volumes (`format: nifti`): `NiftiReader` and `read_nifti`, with nibabel (optional).

`read_nifti` gives one axial slice in stored units (after scl_slope/scl_inter), laid out like
a DICOM axial image; `NiftiReader` maps it to [0, 1] through the site's `window` when set, else
through the slice's own min..max. Needs nibabel (`pip install nibabel`), imported when a file
is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.readers.base import (
    BadImageFileError,
    FrameSpec,
    PathLike,
    ReadImage,
    SiteImageReader,
    frame_index,
)

__all__ = ["NiftiReader", "load_ras", "read_nifti"]


class NiftiReader(SiteImageReader):
    """`format: nifti`: .nii and .nii.gz files; slice `frame` of each volume, in [0, 1].

    With `window` (center, width): center - width/2 -> 0 and center + width/2 -> 1, clipped;
    without: the slice's min -> 0 and max -> 1 (a flat slice is all 0).
    """

    format = "nifti"
    suffixes = (".nii", ".nii.gz")

    def read(self, path: PathLike) -> ReadImage:
        if self.colour == "rgb":  # the site config refuses it; a direct caller gets the same answer
            raise ValueError("NIfTI files are read grey: data.colour rgb is for DICOM and PNG/JPEG")
        pixels = read_nifti(path, slice_index=self.frame)
        if self.window:
            return ReadImage(pixels=_window01(pixels, self.window))  # type: ignore[arg-type]
        return ReadImage(pixels=_min_max01(pixels))


def _window01(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    center, width = window
    return np.clip((x - (center - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def _min_max01(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return np.zeros_like(x) if high == low else ((x - low) / (high - low)).astype(np.float32)


def load_ras(path: PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI file's data (stored units after scaling) turned to the closest RAS+ orientation, and
    its voxel sizes (x, y, z) in that orientation; BadImageFileError naming the file when it cannot
    be read. Needs nibabel (`pip install nibabel`)."""
    try:
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError
    except ImportError as exc:
        raise ImportError("Reading NIfTI needs nibabel, which is not installed: pip install nibabel") from exc

    path = Path(path)
    try:
        img = nib.load(path)
    except ImageFileError as exc:
        raise BadImageFileError(
            path,
            f"not a NIfTI file nibabel can read ({exc})",
            problem="not NIfTI",
            hint="Expected .nii or .nii.gz",
        ) from exc
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        raise BadImageFileError(
            path, f"the NIfTI file cannot be read ({exc}): it is corrupt or truncated", problem="truncated"
        ) from exc

    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise BadImageFileError(
            path,
            f"is a {len(shape)}-D image of shape {img.shape}; read_nifti reads 2-D and 3-D",
            problem="corrupt",
            hint="Split it into 3-D volumes (e.g. `fslsplit`) first",
        )
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape + (1,) * (3 - len(shape)))
    except (OSError, EOFError, ValueError) as exc:
        raise BadImageFileError(
            path, f"the NIfTI data cannot be read ({exc}): it is corrupt or truncated", problem="truncated"
        ) from exc
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    return canonical.get_fdata(dtype=np.float32), tuple(float(z) for z in canonical.header.get_zooms()[:3])


def read_nifti(path: PathLike, *, slice_index: FrameSpec = "middle") -> np.ndarray:
    """Read one axial slice of a NIfTI volume as float32 HxW, in stored units after scaling.

    The volume is first turned to the closest RAS+ orientation (load_ras), so slice 0 is the most
    inferior; the slice is then laid out as a DICOM axial image is displayed (anterior at
    the top, the patient's right on the image's left), so NIfTI and DICOM slices line up.
    """
    path = Path(path)
    ras, _ = load_ras(path)
    index = frame_index(slice_index, ras.shape[2], path, unit="slice")
    # RAS array [x: left->right, y: posterior->anterior] -> rows anterior->posterior,
    # columns patient right->left.
    return np.ascontiguousarray(ras[::-1, ::-1, index].T, dtype=np.float32)
