"""DICOM files: `DicomReader` (the site's reader) and `read_dicom` (one frame, every tag a study needs).

`read_dicom` does what a radiology viewer does, with pydicom's own helpers: modality LUT
(Rescale Slope/Intercept, so CT is in Hounsfield units), then the VOI LUT or window (from the
file, or ``window=(center, width)`` from the site config), then MONOCHROME1 inversion so that
high values are bright for every file. Colour images (RGB, YBR_*, PALETTE COLOR) become
grayscale with the ITU-R BT.601 luma weights 0.299 R + 0.587 G + 0.114 B (what PIL's "L" mode
and the Y of YBR_FULL use). Pixels come out float32 H x W in [0, 1], or in modality units (CT:
HU) with ``apply_voi=False``.

Any transfer syntax with an installed decoder is read; a file whose compression no installed
plugin decodes raises `BadImageFileError` with the `pip install` that would decode it.

    python -c "from common.readers import read_dicom; print(read_dicom('a.dcm').pixels.shape)"
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

from common.readers.base import (
    LUMA,
    BadImageFileError,
    FrameSpec,
    PathLike,
    ReadImage,
    SiteImageReader,
    frame_index,
)

__all__ = ["DicomImage", "DicomReader", "read_dicom"]


# pydicom names a plugin's dependencies by import name; these are the names pip installs.
_PIP_NAMES = {"gdcm": "python-gdcm"}


class DicomReader(SiteImageReader):
    """`format: dicom`: frame `frame` of any file (DICOM files often have no suffix), through
    `window` when set, else the file's own VOI LUT or window (see read_dicom), in [0, 1]."""

    format = "dicom"
    suffixes = ()

    def read(self, path: PathLike) -> ReadImage:
        img = read_dicom(path, frame=self.frame, window=self.window, colour=self.colour == "rgb")  # type: ignore[arg-type]
        if self.colour == "rgb" and not img.is_colour:
            raise self.grey_at_colour_site(path)
        return ReadImage(
            colour_file=img.is_colour,
            pixels=img.pixels,
            modality=img.modality,
            patient_id=img.patient_id,
            sop_instance_uid=img.sop_instance_uid,
            pixel_spacing=img.pixel_spacing,
            n_frames=img.n_frames,
            acquisition=dict(img.acquisition),
        )


@dataclass(frozen=True, eq=False)
class DicomImage:
    """One frame of a DICOM file as a float32 HxW array plus the tags a study needs."""

    pixels: np.ndarray  # float32 (rows, cols), or (rows, cols, 3) RGB with colour=True for a colour file
    modality: str  # "CT", "CR", "US", ... ("" when the file has none)
    patient_id: str
    sop_instance_uid: str
    pixel_spacing: tuple[float, float] | None  # (row, col) in mm; None when unknown
    photometric: str  # as stored in the file: MONOCHROME1/2, RGB, YBR_FULL, PALETTE COLOR, ...
    rows: int
    cols: int
    n_frames: int
    frame: int  # the 0-based frame that `pixels` holds
    acquisition: dict = field(default_factory=dict)  # acquisition_facts: what drift monitoring compares

    @property
    def is_colour(self) -> bool:
        return self.photometric not in ("MONOCHROME1", "MONOCHROME2", "")


def read_dicom(
    path: PathLike,
    *,
    frame: FrameSpec = "middle",
    window: tuple[float, float] | None = None,
    apply_voi: bool = True,
    colour: bool = False,
    dataset: Dataset | None = None,
) -> DicomImage:
    """Read one frame of a DICOM file the way a viewer displays it.

    frame: 0-based index, or "first" / "middle" / "last" (for a single frame all give 0).
    window: (center, width) in modality units (HU for CT), applied as DICOM LINEAR_EXACT, i.e.
        center - width/2 -> 0 and center + width/2 -> 1. It overrides the file's VOI LUT/window.
    apply_voi: False returns modality values (HU for CT) with no window; MONOCHROME1 is still
        inverted, mirrored within the range the stored bits can hold, so high is bright.

    With apply_voi=True the pixels are in [0, 1]: the window from `window`, else the file's VOI
    LUT Sequence, else its Window Center/Width (first pair), else the frame's own min..max.
    Colour frames are turned into luma (see the module docstring) scaled by their bit depth, or
    with `colour` kept as RGB (rows x cols x 3: YBR_FULL, YBR_FULL_422 and the rest converted by
    pydicom, palette colour through its lookup table), scaled by their bit depth.
    Enhanced multi-frame files (per-frame functional groups) use the rescale, window and pixel
    spacing of the chosen frame. `dataset`: the file as `read_dataset` already read it (a series'
    slices are read once).
    """
    path = Path(path)
    if window is not None:
        _check_window(window)
    ds = dataset if dataset is not None else read_dataset(path)
    n_frames = _number_of_frames(ds, path)
    index = frame_index(frame, n_frames, path)
    stored = _decode_frame(ds, index, path)
    attrs = _frame_attributes(ds, index)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()

    if colour and (stored.ndim == 3 or photometric == "PALETTE COLOR"):
        pixels = _colour_rgb(stored, ds, photometric)
    elif stored.ndim == 3 or photometric == "PALETTE COLOR":
        pixels = _colour_to_gray(stored, ds, photometric, window=window, apply_voi=apply_voi)
    else:
        pixels = _monochrome(stored, attrs, photometric, window, apply_voi, path)

    rows, cols = pixels.shape[:2]
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
        acquisition=acquisition_facts(ds),
    )


ACQUISITION_TAGS = {  # fact -> DICOM keyword(s), the first present wins
    "manufacturer": ("Manufacturer",),
    "model": ("ManufacturerModelName",),
    "kvp": ("KVP",),
    "photometric": ("PhotometricInterpretation",),
    "date": ("AcquisitionDate", "ContentDate", "StudyDate"),
}


def acquisition_facts(ds: Dataset) -> dict:
    """The file's acquisition metadata (plain str / float; a tag the file lacks is left out)."""
    out: dict = {}
    for fact, keywords in ACQUISITION_TAGS.items():
        for keyword in keywords:
            value = ds.get(keyword)
            if value not in (None, ""):
                try:
                    out[fact] = float(value) if fact == "kvp" else str(value).strip()
                except (TypeError, ValueError):
                    continue
                break
    return out


def _check_window(window: tuple[float, float]) -> None:
    if len(window) != 2 or not float(window[1]) > 0:
        raise ValueError(
            f"window={window!r}: expected (center, width) with width > 0, "
            "in modality units (e.g. (40, 400) for a CT soft-tissue window)"
        )


def read_dataset(path: Path) -> Dataset:
    """dcmread with the ways a file can be unusable turned into BadImageFileError."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise BadImageFileError(
            path,
            "not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
            problem="not DICOM",
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
            problem="truncated",
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
            problem="corrupt",
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
        problem="no pixel data",
        hint="Remove it from the image folder or the label sheet",
    )


def _truncated(path: Path, what: str = "the file ends inside an element") -> BadImageFileError:
    return BadImageFileError(
        path,
        f"{what}: it is truncated or corrupt",
        problem="truncated",
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
            problem="corrupt",
            hint="Re-export the file from the PACS",
        ) from exc


def _decode_frame(ds: Dataset, index: int, path: Path) -> np.ndarray:
    """Decode one frame (YBR converted to RGB), or say which plugin would decode it."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise BadImageFileError(
            path,
            f"its transfer syntax '{syntax.name}' ({syntax}) has no pixel data decoder in pydicom",
            problem="unsupported compression",
            hint="Convert it to Explicit VR Little Endian (e.g. `gdcmconv --raw` or dcmtk "
            "`dcmdjpeg`/`dcmdrle`) before adding it to the site's data",
        ) from exc
    if not decoder.is_available:
        raise BadImageFileError(
            path,
            f"its pixel data is compressed as '{syntax.name}' ({syntax}) and no installed plugin decodes it",
            problem="unsupported compression",
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
            problem="corrupt",
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


def _rgb_and_bits(stored: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, int]:
    if photometric == "PALETTE COLOR":
        return apply_color_lut(stored, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    return stored, int(ds.get("BitsStored", 8))


def _colour_rgb(stored: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    rgb, bits = _rgb_and_bits(stored, ds, photometric)
    return np.clip(rgb.astype(np.float64) / (2**bits - 1), 0.0, 1.0)


def _colour_to_gray(
    stored: np.ndarray,
    ds: Dataset,
    photometric: str,
    *,
    window: tuple[float, float] | None,
    apply_voi: bool,
) -> np.ndarray:
    rgb, bits = _rgb_and_bits(stored, ds, photometric)
    gray = rgb.astype(np.float64) @ LUMA
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
