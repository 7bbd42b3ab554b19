"""The one interface every image reader of a hospital's files follows, shaped like MONAI's
`ImageReader` (monai/data/image_reader.py): one class per format, `verify_suffix(path)` says
whether a file is one the reader takes, `read(path)` returns a `ReadImage`.

A `ReadImage` is what a site needs of one file: float32 H x W pixels in [0, 1] (the reader
does the windowing), and the facts the site check reports (modality, the Patient ID and SOP
Instance UID in the file, pixel spacing, number of frames). A file the site cannot use raises
`BadImageFileError`, whose `problem` is the short code the site check shows.

Nothing here imports flwr or another reader; `common.readers.reader_for` picks the reader.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "COLOURS",
    "FRAME_WORDS",
    "LUMA",
    "PROBLEMS",
    "BadImageFileError",
    "FrameSpec",
    "PathLike",
    "ReadImage",
    "SiteImageReader",
    "channel_first",
    "frame_index",
    "luma",
]

PathLike = str | os.PathLike[str]
FrameSpec = int | str
FRAME_WORDS = ("first", "middle", "last")

# The short codes of BadImageFileError.problem, as the site check and the site's log show them.
PROBLEMS = (
    "not DICOM",
    "truncated",
    "no pixel data",
    "unsupported compression",
    "not an image",
    "not NIfTI",
    "corrupt",
    "not colour",
    "several series",
    "mixed orientation",
    "duplicate slice",
    "missing slice",
    "uneven spacing",
)
COLOURS = ("grey", "rgb")  # a site config's data.colour
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights: PIL "L" and YBR_FULL's Y, grey from RGB


class BadImageFileError(ValueError):
    """An image file that cannot be read: not an image, corrupt, or needs a missing decoder.

    `reason` says what is wrong, `hint` what to do, `problem` is one of PROBLEMS (the short code
    the site check shows), chosen where the error is raised.
    """

    def __init__(self, path: PathLike, reason: str, *, problem: str, hint: str = "") -> None:
        assert problem in PROBLEMS, f"unknown problem code {problem!r}"
        self.path = Path(path)
        self.reason = reason
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.path}: {reason}" + (f". {hint}" if hint else ""))


@dataclass(frozen=True, eq=False)
class ReadImage:
    """One image as a site uses it: the pixels and the facts read from its file."""

    pixels: (
        np.ndarray
    )  # float32 in [0, 1]: (rows, cols) grey, or (rows, cols, 3) RGB from a reader keeping colour
    modality: str = ""  # "CT", "CR", "US", ... ("" when the format has none)
    patient_id: str = ""  # the Patient ID inside the file ("" when the format has none)
    sop_instance_uid: str = ""
    pixel_spacing: tuple[float, float] | None = None  # (row, col) in mm; None when unknown
    n_frames: int = 1
    colour_file: bool = False  # the file holds a colour image (kept as RGB, or read as grey)
    volume: bool = False  # pixels are a D x H x W volume (common.readers.volume)
    voxel_spacing: tuple[float, float, float] | None = None  # a volume's (slice, row, col) spacing in mm
    slice_uids: tuple[str, ...] = ()  # a DICOM series: each slice's SOP Instance UID, in slice order
    acquisition: dict = field(default_factory=dict)  # DICOM: manufacturer, model, kvp, photometric, date


def luma(rgb: np.ndarray) -> np.ndarray:
    """N x 3 x H x W RGB arrays (MedMNIST's, fedward's colour synthetic images) to N x H x W grey."""
    return np.tensordot(LUMA.astype(np.float32), rgb, axes=([0], [1])).astype(np.float32)


def channel_first(image: ReadImage) -> np.ndarray:
    """A read image as the C x H x W (or 1 x D x H x W volume) float32 array the transforms take."""
    arr = np.ascontiguousarray(image.pixels, dtype=np.float32)
    if arr.ndim == 3 and not image.volume:  # H x W x 3 colour
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    return arr[None]


class SiteImageReader(ABC):
    """One reader per file format, built from a site config's reading settings.

    frame: which frame of a multi-frame file (or slice of a volume): a 0-based index, or
        "first" / "middle" / "last". Formats with one frame per file ignore it.
    window: (center, width) in modality units, mapped to [0, 1]; None: the format's default.
        Formats without modality units ignore it (the site config refuses it for them).
    """

    format: str = ""  # the site config's `data.format`
    suffixes: tuple[str, ...] = ()  # lower-case file name endings the reader takes; () = any file
    takes_folders = False  # each image is a folder of files (a DICOM series), not a file

    def __init__(
        self, *, frame: FrameSpec = "middle", window: Sequence[float] | None = None, colour: str = "grey"
    ) -> None:
        if colour not in COLOURS:
            raise ValueError(f"colour={colour!r}: use one of {COLOURS}")
        self.frame = frame
        self.window = tuple(float(v) for v in window) if window else None
        self.colour = colour

    def grey_at_colour_site(self, path: PathLike) -> BadImageFileError:
        return BadImageFileError(
            path, "a grey image at a site that reads colour (data.colour: rgb)", problem="not colour",
            hint="Remove it from the colour site's data, or read the site in grey (data.colour: grey)",
        )  # fmt: skip

    def verify_suffix(self, path: PathLike) -> bool:
        """Whether the file's name ends in one of `suffixes` (any case); always, when they are ()."""
        return not self.suffixes or Path(path).name.lower().endswith(self.suffixes)

    @abstractmethod
    def read(self, path: PathLike) -> ReadImage:
        """The file's pixels in [0, 1] and its facts; BadImageFileError when it cannot be used."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(frame={self.frame!r}, window={self.window!r}, colour={self.colour!r})"


def frame_index(frame: FrameSpec, n_frames: int, path: Path, unit: str = "frame") -> int:
    """The 0-based index `frame` names among `n_frames`; out of range is a BadImageFileError."""
    if isinstance(frame, str):
        if frame not in FRAME_WORDS:
            raise ValueError(f"{unit}={frame!r}: use a 0-based index or one of {FRAME_WORDS}")
        return {"first": 0, "middle": n_frames // 2, "last": n_frames - 1}[frame]
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
        raise TypeError(f"{unit}={frame!r}: use a 0-based int or one of {FRAME_WORDS}")
    if not 0 <= frame < n_frames:
        raise BadImageFileError(
            path,
            f"{unit} {frame} is out of range: the file has {n_frames} {unit}(s) (valid: 0..{n_frames - 1})",
            problem="corrupt",
            hint=f"Use '{FRAME_WORDS[0]}', '{FRAME_WORDS[1]}' or '{FRAME_WORDS[2]}', "
            "or an index in that range",
        )
    return int(frame)
