"""PNG and JPEG files (`format: image`): `RasterReader` and `read_image`, with PIL.

Pixels come out float32 grey H x W in [0, 1]: colour becomes BT.601 luma (PIL "L"), or with
`colour` stays RGB (H x W x 3, PIL "RGB"); alpha is dropped, EXIF orientation is applied, 8-bit images are divided by 255, 16-bit ones by 65535.
The files carry none of the facts a DICOM file does (modality, patient, spacing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.readers.base import BadImageFileError, PathLike, ReadImage, SiteImageReader

__all__ = ["RasterReader", "read_image"]


class RasterReader(SiteImageReader):
    """`format: image`: .png, .jpg and .jpeg files, one frame each, grey in [0, 1]."""

    format = "image"
    suffixes = (".png", ".jpg", ".jpeg")

    def read(self, path: PathLike) -> ReadImage:
        pixels, is_colour = read_image(path, colour=self.colour == "rgb", with_colour=True)
        if self.colour == "rgb" and not is_colour:
            raise self.grey_at_colour_site(path)
        return ReadImage(pixels=pixels, colour_file=is_colour)


COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA")


def read_image(path: PathLike, *, colour: bool = False, with_colour: bool = False):
    """Read a PNG or JPEG as float32 grey H x W in [0, 1] (see the module docstring), or with `colour`
    a colour file as H x W x 3 RGB; with `with_colour`, also whether the file holds colour."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            is_colour = img.mode in COLOUR_MODES
            if colour and is_colour:
                pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(img, dtype=np.float64) / 65535.0
            elif img.mode == "F":
                pixels = np.asarray(img, dtype=np.float64)
            else:
                pixels = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except UnidentifiedImageError as exc:
        raise BadImageFileError(
            path,
            "not an image PIL can read (expected PNG or JPEG)",
            problem="not an image",
            hint="For DICOM use read_dicom, for NIfTI read_nifti",
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError | IsADirectoryError):
            raise
        raise BadImageFileError(
            path,
            f"the image cannot be decoded ({exc}): it is corrupt or truncated",
            problem="truncated",
            hint="Export it again or remove it from the site's data",
        ) from exc
    pixels = pixels.astype(np.float32)
    return (pixels, is_colour) if with_colour else pixels
