"""Read hospital image files and label sheets into plain arrays and rows.

What each reader returns:

=============  ===========================================  =================================
reader         file                                         pixels
=============  ===========================================  =================================
read_dicom     DICOM (any transfer syntax with a decoder)   float32 HxW; [0, 1] after the VOI
                                                            window, or modality units (CT: HU)
                                                            with ``apply_voi=False``
read_image     PNG / JPEG (PIL)                             float32 HxW in [0, 1]
read_nifti     NIfTI-1/2 (nibabel, optional)                float32 HxW axial slice, stored
                                                            values after scl_slope/scl_inter
=============  ===========================================  =================================

``read_dicom`` does what a radiology viewer does, with pydicom's own helpers: modality LUT
(Rescale Slope/Intercept, so CT is in Hounsfield units), then the VOI LUT or window (from the
file, or ``window=(center, width)`` from the study config), then MONOCHROME1 inversion so that
high values are bright for every file. Colour images (RGB, YBR_*, PALETTE COLOR) become
grayscale with the ITU-R BT.601 luma weights 0.299 R + 0.587 G + 0.114 B (what PIL's "L" mode
and the Y of YBR_FULL use).

Files a site cannot use raise ``BadImageFileError`` (a ``ValueError``) naming the file, what is
wrong with it and what to do; label sheets raise ``LabelFileError`` naming the file, line and
column. Nothing here imports flwr.

    python -c "from common.readers import read_dicom; print(read_dicom('a.dcm').pixels.shape)"
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.pixels import apply_voi as apply_voi_sequence  # `apply_voi` is our flag
from pydicom.pixels.utils import get_nr_frames

__all__ = [
    "SPLITS",
    "BadImageFileError",
    "DicomImage",
    "LabelFileError",
    "LabelRow",
    "patient_split",
    "read_dicom",
    "read_image",
    "read_labels_csv",
    "read_nifti",
]

PathLike = str | os.PathLike[str]
FrameSpec = int | str
SPLITS = ("train", "val", "test")
_FRAME_WORDS = ("first", "middle", "last")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL "L" and YBR_FULL's Y

# pydicom names a plugin's dependencies by import name; these are the names pip installs.
_PIP_NAMES = {"gdcm": "python-gdcm"}


class BadImageFileError(ValueError):
    """An image file that cannot be read: not an image, corrupt, or needs a missing decoder."""

    def __init__(self, path: PathLike, reason: str, *, hint: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"{self.path}: {reason}" + (f". {hint}" if hint else ""))


class LabelFileError(ValueError):
    """A label sheet (CSV) with a missing column, an unknown label or no rows."""

    def __init__(
        self, path: PathLike, reason: str, *, line: int | None = None, column: str | None = None
    ) -> None:
        self.path = Path(path)
        self.reason = reason
        self.line = line
        self.column = column
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {reason}")


# ----------------------------------------------------------------------------------------- DICOM


@dataclass(frozen=True, eq=False)
class DicomImage:
    """One frame of a DICOM file as a float32 HxW array plus the tags a study needs."""

    pixels: np.ndarray  # float32 (rows, cols)
    modality: str  # "CT", "CR", "US", ... ("" when the file has none)
    patient_id: str
    sop_instance_uid: str
    pixel_spacing: tuple[float, float] | None  # (row, col) in mm; None when unknown
    photometric: str  # as stored in the file: MONOCHROME1/2, RGB, YBR_FULL, PALETTE COLOR, ...
    rows: int
    cols: int
    n_frames: int
    frame: int  # the 0-based frame that `pixels` holds


def read_dicom(
    path: PathLike,
    *,
    frame: FrameSpec = "middle",
    window: tuple[float, float] | None = None,
    apply_voi: bool = True,
) -> DicomImage:
    """Read one frame of a DICOM file the way a viewer displays it.

    frame: 0-based index, or "first" / "middle" / "last" (for a single frame all give 0).
    window: (center, width) in modality units (HU for CT), applied as DICOM LINEAR_EXACT, i.e.
        center - width/2 -> 0 and center + width/2 -> 1. It overrides the file's VOI LUT/window.
    apply_voi: False returns modality values (HU for CT) with no window; MONOCHROME1 is still
        inverted, mirrored within the range the stored bits can hold, so high is bright.

    With apply_voi=True the pixels are in [0, 1]: the window from `window`, else the file's VOI
    LUT Sequence, else its Window Center/Width (first pair), else the frame's own min..max.
    Colour frames are turned into luma (see the module docstring) scaled by their bit depth.
    Enhanced multi-frame files (per-frame functional groups) use the rescale, window and pixel
    spacing of the chosen frame.
    """
    path = Path(path)
    if window is not None:
        _check_window(window)
    ds = _read_dataset(path)
    n_frames = _number_of_frames(ds, path)
    index = _frame_index(frame, n_frames, path)
    stored = _decode_frame(ds, index, path)
    attrs = _frame_attributes(ds, index)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()

    if stored.ndim == 3 or photometric == "PALETTE COLOR":
        pixels = _colour_to_gray(stored, ds, photometric, window=window, apply_voi=apply_voi)
    else:
        pixels = _monochrome(stored, attrs, photometric, window, apply_voi, path)

    rows, cols = pixels.shape
    return DicomImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        modality=str(ds.get("Modality", "")),
        patient_id=str(ds.get("PatientID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        pixel_spacing=_pixel_spacing(attrs, ds),
        photometric=photometric,
        rows=rows,
        cols=cols,
        n_frames=n_frames,
        frame=index,
    )


def _check_window(window: tuple[float, float]) -> None:
    if len(window) != 2 or not float(window[1]) > 0:
        raise ValueError(
            f"window={window!r}: expected (center, width) with width > 0, "
            "in modality units (e.g. (40, 400) for a CT soft-tissue window)"
        )


def _read_dataset(path: Path) -> Dataset:
    """dcmread with the ways a file can be unusable turned into BadImageFileError."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise BadImageFileError(
            path,
            "not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
            hint="Check that the path points at a .dcm file; a DICOM written without its "
            "preamble and File Meta Information must be re-saved by a conformant tool "
            "(e.g. dcmtk `dcmconv` or pydicom `save_as(..., enforce_file_format=True)`)",
        ) from exc
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed bytes
        raise BadImageFileError(
            path,
            f"the DICOM file cannot be parsed ({type(exc).__name__}: {exc}): it is corrupt or truncated",
            hint="Copy it again from the PACS or remove it from the site's data",
        ) from exc

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _no_pixel_data(path, ds)
    if _last_element_truncated(ds):
        raise _truncated(path)
    if "TransferSyntaxUID" not in ds.file_meta:
        raise BadImageFileError(
            path,
            "its File Meta Information has no Transfer Syntax UID, so the pixel data cannot be decoded",
            hint="Re-export the file from the PACS",
        )
    return ds


def _no_pixel_data(path: Path, ds: Dataset) -> BadImageFileError:
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    name = getattr(sop_class, "name", "") or ""
    if not name or "Image" in name:
        # An image object (or one cut off before its SOP Class) that stops before its pixels.
        return _truncated(path, what="the file ends before its Pixel Data element")
    return BadImageFileError(
        path,
        f"has no pixel data: it is a '{name}' object, not an image",
        hint="Remove it from the image folder or the label sheet",
    )


def _truncated(path: Path, what: str = "the file ends inside an element") -> BadImageFileError:
    return BadImageFileError(
        path,
        f"{what}: it is truncated or corrupt",
        hint="Copy it again from the PACS or remove it from the site's data",
    )


def _last_element_truncated(ds: Dataset) -> bool:
    """True if the last element's value is shorter than its declared length (pydicom's
    reader stops quietly at the end of a file)."""
    last = ds.get_item(next(reversed(ds.keys())))
    return (
        isinstance(last, RawDataElement)
        and isinstance(last.value, bytes)
        and last.length != 0xFFFFFFFF
        and len(last.value) < last.length
    )


def _number_of_frames(ds: Dataset, path: Path) -> int:
    try:
        return int(get_nr_frames(ds, warn=False))
    except (TypeError, ValueError) as exc:
        raise BadImageFileError(
            path,
            f"its Number of Frames {ds.get('NumberOfFrames')!r} is not an integer",
            hint="Re-export the file from the PACS",
        ) from exc


def _frame_index(frame: FrameSpec, n_frames: int, path: Path, unit: str = "frame") -> int:
    if isinstance(frame, str):
        if frame not in _FRAME_WORDS:
            raise ValueError(f"{unit}={frame!r}: use a 0-based index or one of {_FRAME_WORDS}")
        return {"first": 0, "middle": n_frames // 2, "last": n_frames - 1}[frame]
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
        raise TypeError(f"{unit}={frame!r}: use a 0-based int or one of {_FRAME_WORDS}")
    if not 0 <= frame < n_frames:
        raise BadImageFileError(
            path,
            f"{unit} {frame} is out of range: the file has {n_frames} {unit}(s) (valid: 0..{n_frames - 1})",
            hint=f"Use '{_FRAME_WORDS[0]}', '{_FRAME_WORDS[1]}' or '{_FRAME_WORDS[2]}', "
            "or an index in that range",
        )
    return int(frame)


def _decode_frame(ds: Dataset, index: int, path: Path) -> np.ndarray:
    """Decode one frame (YBR converted to RGB), or say which plugin would decode it."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise BadImageFileError(
            path,
            f"its transfer syntax '{syntax.name}' ({syntax}) has no pixel data decoder in pydicom",
            hint="Convert it to Explicit VR Little Endian (e.g. `gdcmconv --raw` or dcmtk "
            "`dcmdjpeg`/`dcmdrle`) before adding it to the site's data",
        ) from exc
    if not decoder.is_available:
        raise BadImageFileError(
            path,
            f"its pixel data is compressed as '{syntax.name}' ({syntax}) and no installed plugin decodes it",
            hint=_plugin_hint(decoder.missing_dependencies),
        )
    try:
        return pixel_array(ds, index=index)
    except Exception as exc:  # the plugins raise ValueError/RuntimeError/OSError
        if "less than expected" in str(exc):
            raise _truncated(path, what="the pixel data is shorter than Rows x Columns x frames") from exc
        missing = decoder.missing_dependencies
        raise BadImageFileError(
            path,
            f"its '{syntax.name}' pixel data cannot be decoded by the installed plugin(s) "
            f"{list(decoder.available_plugins)} ({type(exc).__name__}: {exc})",
            hint=_plugin_hint(missing)
            if missing
            else "The file is probably corrupt: copy it again from the PACS or remove it",
        ) from exc


def _plugin_hint(missing: list[str]) -> str:
    """Turn pydicom's 'label - requires a>=1 and b>=2' strings into pip commands."""
    options = []
    for entry in missing:
        _, _, requires = entry.partition(" - requires ")
        if not requires:
            continue
        names = requires.replace(" and ", ", ").split(", ")
        specs = []
        for spec in names:
            name = spec.split(">")[0].split("=")[0].strip()
            if name == "numpy":
                continue
            specs.append(f'"{spec.replace(name, _PIP_NAMES.get(name, name), 1)}"')
        if specs:
            options.append("pip install " + " ".join(specs))
    if not options:
        return "No pydicom plugin decodes it: convert the file to Explicit VR Little Endian"
    return "Install one of these decoders: " + "; or ".join(options)


def _frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The tags that turn stored values into display values, for one frame.

    Enhanced multi-frame files keep rescale, window and spacing in functional groups (per
    frame, else shared); pydicom's helpers read them from the top level, so copy them up.
    """
    attrs = Dataset()
    attrs.file_meta = ds.file_meta  # LUT data of VR OW needs the byte order
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "VOILUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "PixelSpacing",
    ):
        if keyword in ds:
            setattr(attrs, keyword, ds[keyword].value)

    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for sequence, keywords in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ("PixelMeasuresSequence", ("PixelSpacing",)),
    ):
        for group in reversed(groups):  # shared first, then per-frame wins
            if group.get(sequence):
                item = group[sequence][0]
                for keyword in keywords:
                    if keyword in item:
                        setattr(attrs, keyword, item[keyword].value)
    return attrs


def _monochrome(
    stored: np.ndarray,
    attrs: Dataset,
    photometric: str,
    window: tuple[float, float] | None,
    apply_voi: bool,
    path: Path,
) -> np.ndarray:
    values = apply_modality_lut(stored, attrs)
    inverted = photometric == "MONOCHROME1"
    if not apply_voi:
        values = values.astype(np.float64)
        if inverted:
            low, high = _modality_range(attrs)
            values = low + high - values
        return values

    if window is not None:
        shown = _window(values, float(window[0]), float(window[1]), "LINEAR_EXACT")
    elif attrs.get("VOILUTSequence"):
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)  # LUT inputs are integers
        bits = int(attrs.VOILUTSequence[0].LUTDescriptor[2])
        shown = apply_voi_sequence(values, attrs).astype(np.float64) / (2**bits - 1)
    elif attrs.get("WindowCenter") is not None and attrs.get("WindowWidth") is not None:
        function = str(attrs.get("VOILUTFunction") or "LINEAR").strip().upper()
        try:
            center, width = _first(attrs.WindowCenter), _first(attrs.WindowWidth)
            shown = _window(values, center, width, function)
        except (TypeError, ValueError) as exc:
            warnings.warn(f"{path}: ignoring its window ({exc}); scaling min..max", stacklevel=3)
            shown = _min_max(values)
    else:
        shown = _min_max(values)
    return 1.0 - shown if inverted else shown


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """pydicom's windowing onto [0, 1]: a 16-bit unsigned output range, divided out."""
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored = 16
    voi.PixelRepresentation = 0
    voi.WindowCenter = center
    voi.WindowWidth = width
    voi.VOILUTFunction = function
    return apply_windowing(values, voi) / 65535.0


def _modality_range(attrs: Dataset) -> tuple[float, float]:
    """Lowest and highest modality value the stored bits can give."""
    bits = int(attrs.get("BitsStored", 16))
    if attrs.get("PixelRepresentation", 0) == 1:
        extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    else:
        extremes = np.array([0, 2**bits - 1], dtype=np.int64)
    mapped = apply_modality_lut(extremes, attrs).astype(np.float64)
    return float(mapped.min()), float(mapped.max())


def _colour_to_gray(
    stored: np.ndarray,
    ds: Dataset,
    photometric: str,
    *,
    window: tuple[float, float] | None,
    apply_voi: bool,
) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        rgb = stored
        bits = int(ds.get("BitsStored", 8))
    gray = rgb.astype(np.float64) @ _LUMA
    if not apply_voi:
        return gray
    if window is not None:
        return _window(gray, float(window[0]), float(window[1]), "LINEAR_EXACT")
    return gray / (2**bits - 1)


def _min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _first(value: object) -> float:
    """Window Center/Width may hold several alternatives; pydicom's default is the first."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _pixel_spacing(attrs: Dataset, ds: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing (frame, then top level), else Imager Pixel Spacing (at the detector)."""
    for spacing in (attrs.get("PixelSpacing"), ds.get("ImagerPixelSpacing")):
        try:
            row, col = (float(v) for v in spacing)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return (row, col)
    return None


# ------------------------------------------------------------------------------ PNG, JPEG, NIfTI


def read_image(path: PathLike) -> np.ndarray:
    """Read a PNG or JPEG as float32 grayscale HxW in [0, 1].

    Colour becomes BT.601 luma (PIL "L"), alpha is dropped, EXIF orientation is applied, and
    8-bit images are divided by 255, 16-bit ones by 65535.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(img, dtype=np.float64) / 65535.0
            elif img.mode == "F":
                pixels = np.asarray(img, dtype=np.float64)
            else:
                pixels = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except UnidentifiedImageError as exc:
        raise BadImageFileError(
            path,
            "not an image PIL can read (expected PNG or JPEG)",
            hint="For DICOM use read_dicom, for NIfTI read_nifti",
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError | IsADirectoryError):
            raise
        raise BadImageFileError(
            path,
            f"the image cannot be decoded ({exc}): it is corrupt or truncated",
            hint="Export it again or remove it from the site's data",
        ) from exc
    return pixels.astype(np.float32)


def read_nifti(path: PathLike, *, slice_index: FrameSpec = "middle") -> np.ndarray:
    """Read one axial slice of a NIfTI volume as float32 HxW, in stored units after scaling.

    The volume is first turned to the closest RAS+ orientation, so slice 0 is the most
    inferior; the slice is then laid out as a DICOM axial image is displayed (anterior at
    the top, the patient's right on the image's left), so NIfTI and DICOM slices line up.
    Needs nibabel (`pip install nibabel`).
    """
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
            path, f"not a NIfTI file nibabel can read ({exc})", hint="Expected .nii or .nii.gz"
        ) from exc
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        raise BadImageFileError(
            path, f"the NIfTI file cannot be read ({exc}): it is corrupt or truncated"
        ) from exc

    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise BadImageFileError(
            path,
            f"is a {len(shape)}-D image of shape {img.shape}; read_nifti reads 2-D and 3-D",
            hint="Split it into 3-D volumes (e.g. `fslsplit`) first",
        )
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape + (1,) * (3 - len(shape)))
    except (OSError, EOFError, ValueError) as exc:
        raise BadImageFileError(
            path, f"the NIfTI data cannot be read ({exc}): it is corrupt or truncated"
        ) from exc
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine)).get_fdata(dtype=np.float32)
    index = _frame_index(slice_index, ras.shape[2], path, unit="slice")
    # RAS array [x: left->right, y: posterior->anterior] -> rows anterior->posterior,
    # columns patient right->left.
    return np.ascontiguousarray(ras[::-1, ::-1, index].T, dtype=np.float32)


# ------------------------------------------------------------------------------- labels, splits


@dataclass(frozen=True)
class LabelRow:
    """One row of a site's label sheet."""

    file: str | None  # path relative to the site's image folder, as written
    sop_instance_uid: str | None
    patient_id: str
    label: str
    label_index: int  # position of `label` in the study's classes
    split: str | None  # "train" / "val" / "test" when the site fixes it
    line: int  # line in the CSV, for messages


def read_labels_csv(path: PathLike, *, classes: list[str]) -> list[LabelRow]:
    """Read a label sheet: columns `file` and/or `sop_instance_uid`, `patient_id`, `label`,
    optional `split`. Header names are matched case-insensitively; values are stripped.

    Raises LabelFileError naming the file, line and column for: an empty file or one with
    no rows, a missing column, an empty key or patient, a label not in `classes`, a split
    other than train/val/test, and the same image listed twice.
    """
    path = Path(path)
    allowed = list(classes)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(
            path,
            f"not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r}); save the sheet as 'CSV UTF-8'",
            line=raw[: exc.start].count(b"\n") + 1,
        ) from exc
    records = _records(csv.reader(io.StringIO(text, newline="")), path)
    _, header = next(records, (1, []))
    if not any(h.strip() for h in header):
        raise LabelFileError(
            path,
            "the file is empty: expected a header row with columns file (or "
            "sop_instance_uid), patient_id, label and optionally split",
            line=1,
        )
    columns = [h.strip().lower() for h in header]
    keys = [c for c in ("file", "sop_instance_uid") if c in columns]
    if not keys:
        raise LabelFileError(
            path,
            f"no image column: add 'file' (path relative to the image folder) or "
            f"'sop_instance_uid' (header has {columns})",
            line=1,
            column="file",
        )
    for required in ("patient_id", "label"):
        if required not in columns:
            raise LabelFileError(path, f"missing column (header has {columns})", line=1, column=required)

    rows: list[LabelRow] = []
    seen: dict[tuple[str, str], int] = {}
    for line, record in records:
        if not any(v.strip() for v in record):
            continue  # blank line
        if len(record) != len(columns):
            raise LabelFileError(path, f"has {len(record)} values, the header has {len(columns)}", line=line)
        values = {c: v.strip() for c, v in zip(columns, record, strict=True)}
        present = {k: values[k] for k in keys if values[k]}
        if not present:
            raise LabelFileError(
                path, "empty: every row needs the image it labels", line=line, column=keys[0]
            )
        for key, value in present.items():
            if (key, value) in seen:
                raise LabelFileError(
                    path,
                    f"'{value}' is listed twice (first on line {seen[key, value]})",
                    line=line,
                    column=key,
                )
            seen[key, value] = line
        if not values["patient_id"]:
            raise LabelFileError(
                path,
                "empty: patient_id keeps a patient in one split",
                line=line,
                column="patient_id",
            )
        label = values["label"]
        if label not in allowed:
            raise LabelFileError(
                path,
                f"'{label}' is not one of the study's classes {allowed}; fix the label or "
                "add the class to the study config",
                line=line,
                column="label",
            )
        split = values.get("split", "").lower() or None
        if split is not None and split not in SPLITS:
            raise LabelFileError(
                path,
                f"'{values['split']}' is not a split; use one of {list(SPLITS)} or leave it empty",
                line=line,
                column="split",
            )
        rows.append(
            LabelRow(
                file=values.get("file") or None,
                sop_instance_uid=values.get("sop_instance_uid") or None,
                patient_id=values["patient_id"],
                label=label,
                label_index=allowed.index(label),
                split=split,
                line=line,
            )
        )
    if not rows:
        raise LabelFileError(path, "the file has a header but no rows", line=2)
    return rows


def _records(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, values) per CSV record, with the csv module's errors named by file and line."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise LabelFileError(path, f"not valid CSV ({exc})", line=reader.line_num) from exc
        yield reader.line_num, record


def patient_split(
    rows: Sequence[LabelRow],
    *,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> dict[str, list[int]]:
    """Split row indices into train/val/test by patient, so no patient is in two splits.

    Patients whose rows carry a `split` go there (all their rows must agree). The others are
    shuffled with `seed` (in sorted patient-id order, so the CSV's row order does not matter)
    and cut by patient count into `fractions` (train, val, test). Same rows and seed, same split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions={fractions!r}: expected three non-negative numbers (train, val, test) that sum to 1"
        )
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_patient[row.patient_id].append(i)

    assigned: dict[str, str] = {}
    for patient, indices in by_patient.items():
        given = {rows[i].split for i in indices if rows[i].split}
        if len(given) > 1:
            lines = sorted(rows[i].line for i in indices)
            raise ValueError(
                f"patient '{patient}' has rows in splits {sorted(given)} (lines {lines}); "
                "one patient must stay in one split"
            )
        if given:
            assigned[patient] = given.pop()

    free = sorted(p for p in by_patient if p not in assigned)
    order = np.random.default_rng(seed).permutation(len(free))
    cuts = np.rint(np.cumsum(fractions) * len(free)).astype(int)
    cuts[-1] = len(free)
    for rank, k in enumerate(order):
        assigned[free[k]] = SPLITS[int(np.searchsorted(cuts, rank, side="right"))]

    split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for patient, indices in by_patient.items():
        split[assigned[patient]].extend(indices)
    return {name: sorted(indices) for name, indices in split.items()}
