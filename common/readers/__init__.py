"""Read a hospital's image files: one reader per format behind one interface (common.readers.base).

=============  ==============  =================  =========================================
data.format    reader          files              pixels (float32 H x W in [0, 1])
=============  ==============  =================  =========================================
dicom          DicomReader     any name           frame `data.frame`; modality LUT, then
                                                  `data.window` or the file's VOI LUT /
                                                  window, MONOCHROME1 inverted (dicom.py)
image          RasterReader    .png .jpg .jpeg    grey (BT.601 luma), or RGB with
                                                  `data.colour: rgb` (raster.py)
nifti          NiftiReader     .nii .nii.gz       axial slice `data.frame`, through
                                                  `data.window`, else its min..max (nifti.py)
=============  ==============  =================  =========================================

`reader_for(data)` builds the reader a site config names. Each reader's `read(path)` returns a
`ReadImage` (pixels and the facts the site check reports) or raises `BadImageFileError`, whose
`problem` is the short code the check shows. The functions under the readers (`read_dicom`,
`read_image`, `read_nifti`) give more: every frame option, modality units, stored values.
Label sheets are common.labels. Nothing here imports flwr.

    python -c "from common.readers import read_dicom; print(read_dicom('a.dcm').pixels.shape)"
"""

from __future__ import annotations

from common.readers.base import (
    COLOURS,
    PROBLEMS,
    BadImageFileError,
    ReadImage,
    SiteImageReader,
    channel_first,
)
from common.readers.dicom import DicomImage, DicomReader, read_dicom
from common.readers.nifti import NiftiReader, read_nifti
from common.readers.raster import RasterReader, read_image
from common.readers.volume import DicomSeriesReader, NiftiVolumeReader, read_dicom_series
from common.schema import SiteDataConfig

__all__ = [
    "COLOURS",
    "FORMATS",
    "PROBLEMS",
    "READERS",
    "BadImageFileError",
    "DicomImage",
    "DicomReader",
    "DicomSeriesReader",
    "NiftiReader",
    "NiftiVolumeReader",
    "VOLUME_READERS",
    "RasterReader",
    "ReadImage",
    "SiteImageReader",
    "channel_first",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "reader_for",
]

READERS: dict[str, type[SiteImageReader]] = {
    reader.format: reader for reader in (DicomReader, RasterReader, NiftiReader)
}
FORMATS = tuple(READERS)  # the site config formats read from a folder of files
VOLUME_READERS: dict[str, type[SiteImageReader]] = {"dicom": DicomSeriesReader, "nifti": NiftiVolumeReader}


def reader_for(data: SiteDataConfig) -> SiteImageReader:
    """The reader of a site's `data.format`, with its `frame`, `window` and `colour` settings."""
    if data.format not in READERS:
        raise ValueError(f"format {data.format!r}: the image readers read {FORMATS}")
    if data.volume:
        if data.format not in VOLUME_READERS:
            raise ValueError(f"format {data.format!r}: volumes are read from {tuple(VOLUME_READERS)}")
        return VOLUME_READERS[data.format](window=data.window)
    return READERS[data.format](frame=data.frame, window=data.window, colour=data.colour)
