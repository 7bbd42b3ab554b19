"""Segmentation masks beside a site's images (the label sheet's `mask` column): PNG, NIfTI or DICOM-SEG.

`read_mask(path, image)` gives the mask of one read image as an int64 rows x cols label map (values:
class indices, 0 the background), checked against the image it labels:

- PNG/JPEG: the pixel values are the class indices; a two-valued 0/255 mask is read as 0/1.
- NIfTI: the slice `frame` of the volume (as the image's own reader takes it), rounded.
- DICOM-SEG (highdicom): the segments of the frame that references the image's SOP Instance UID;
  segment k is class k. A SEG that references another image, or another patient, is refused.

A mask whose size differs from its image's stored size, or with values past the site's classes,
is a `MaskError` naming the file and what differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.readers.base import FrameSpec, PathLike

__all__ = ["MaskError", "read_mask"]


class MaskError(ValueError):
    """A mask that cannot label its image: `problem` is the short code the site check shows."""

    def __init__(self, path: PathLike, reason: str, problem: str = "mask mismatch") -> None:
        self.path, self.reason, self.problem = Path(path), reason, problem
        super().__init__(f"{path}: {reason}")


def read_mask(
    path: PathLike,
    *,
    shape: tuple[int, ...],
    patient_id: str,
    sop_instance_uid: str,
    num_classes: int,
    frame: FrameSpec = "middle",
    slice_uids: tuple[str, ...] = (),
) -> np.ndarray:
    """The label map of an image (its stored `shape`, Patient ID and SOP Instance UID as read from its
    file) from the mask file at `path` (the module docstring). A volume (`shape` of 3) takes a whole
    NIfTI mask volume, or a DICOM-SEG whose frames reference its slices (`slice_uids`, in slice order:
    each frame lands on the slice it references)."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise MaskError(path, "the mask file does not exist", problem="file not found")
    if name.endswith((".png", ".jpg", ".jpeg")):
        mask = _raster(path)
    elif name.endswith((".nii", ".nii.gz")) and len(shape) == 3:
        mask = np.rint(_nifti_volume(path)).astype(np.int64)
    elif name.endswith((".nii", ".nii.gz")):
        from common.readers.nifti import read_nifti

        mask = np.rint(read_nifti(path, slice_index=frame)).astype(np.int64)
    else:
        mask = _dicom_seg(path, patient_id, tuple(slice_uids) or (sop_instance_uid,))
        mask = mask if slice_uids else mask[0]
    if mask.shape != tuple(shape):
        raise MaskError(
            path, f"the mask is {'x'.join(map(str, mask.shape))}, its image {'x'.join(map(str, shape))}"
        )
    if mask.min() < 0 or mask.max() >= num_classes:
        raise MaskError(path, f"mask values {sorted(np.unique(mask).tolist())[:8]} run past the site's "
                        f"{num_classes} classes (0..{num_classes - 1})", problem="bad mask")  # fmt: skip
    return mask


def _raster(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16") else img).astype(
                np.int64
            )
    except (UnidentifiedImageError, OSError) as err:
        raise MaskError(path, f"the mask cannot be read ({err})", problem="bad mask") from err
    values = set(np.unique(mask).tolist())
    return (mask > 0).astype(np.int64) if values <= {0, 255} else mask


def _nifti_volume(path: Path) -> np.ndarray:
    """A NIfTI mask in the layout of common.readers.volume's NIfTI volumes (slices, rows, columns)."""
    from common.readers.nifti import load_ras

    ras, _ = load_ras(path)
    return ras[::-1, ::-1, :].transpose(2, 1, 0)


def _dicom_seg(path: Path, patient_id: str, uids: tuple[str, ...]) -> np.ndarray:
    """The SEG's label map of each image in `uids` (len(uids) x rows x cols), in that order."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # noqa: BLE001 - pydicom and highdicom raise many kinds for a foreign file
        raise MaskError(path, f"not a DICOM-SEG highdicom can read ({err})", problem="bad mask") from err
    if patient_id and str(seg.get("PatientID", "")) not in ("", patient_id):
        raise MaskError(path, f"the SEG is of patient '{seg.PatientID}', its image of '{patient_id}'")
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    if not referenced & set(uids):
        raise MaskError(path, f"the SEG references {sorted(referenced)[:3]}, not its image {uids[0]}"
                        + (f" or any of its {len(uids)} slices" if len(uids) > 1 else ""))  # fmt: skip
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(uids), segment_numbers=seg.get_segment_numbers(), combine_segments=True,
        assert_missing_frames_are_empty=True,
    )  # fmt: skip
    return np.asarray(pixels, dtype=np.int64)
