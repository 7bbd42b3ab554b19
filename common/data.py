"""`load_site_data(config)`: a site's data from its site config, whatever the format.

synthetic (common.synthetic), medmnist (common.medmnist), and a hospital's own folder of DICOM,
PNG/JPEG or NIfTI files (common.sources). Raises `SiteDataError` naming the site and what to do.
"""

from __future__ import annotations

from common.medmnist import medmnist_site
from common.schema import SiteConfig
from common.sitedata import SiteData, SiteDataError
from common.sources import FOLDER_FORMATS, load_folder_site
from common.synthetic import synthetic_site

LOADERS = {
    "synthetic": synthetic_site,
    "medmnist": medmnist_site,
    **dict.fromkeys(FOLDER_FORMATS, load_folder_site),
}


def load_site_data(config: SiteConfig) -> SiteData:
    """Load a site's data and check that it can train: raises SiteDataError naming the site."""
    fmt = config.data.format
    if fmt not in LOADERS:
        raise SiteDataError(f"site '{config.site}': data format '{fmt}' is not supported yet.")
    data = LOADERS[fmt](config)
    if len(data.train_y) == 0:
        raise SiteDataError(
            f"site '{config.site}' has no training images ({config.data.format} data"
            f"{' at ' + config.data.path if config.data.path else ''}); give it data or leave it "
            f"out of the study."
        )
    return data
