"""Where `fedward serve` keeps an image while it serves it: a private temporary folder of its own, under
the node's, deleted with everything in it when the image is done (client.dicom_node, the C-STORE node;
client.dicomweb_poller, the DICOMweb one). So no copy of a patient's image, and no result already in
the PACS, outlives its serving. Results the PACS did not take are moved to the operator's undelivered
folder first (`keep_undelivered`), to be sent on, not lost."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.uid import UID

log = logging.getLogger("fedward.serve")


class NotAUid(ValueError):
    """A SOP Instance UID that is not one (a file name is made from it)."""


@contextmanager
def image_file(work: Path, sop_instance_uid: str) -> Iterator[Path]:
    """The path to save one image at, `<its SOP Instance UID>.dcm` (its results are named after it) in a
    folder of its own under `work`, removed on leaving, whatever happened. A UID that is not a valid
    DICOM UID (digits and dots, at most 64) is refused: it came from the network, and a name such as
    `../x` would write outside the folder."""
    if not UID(str(sop_instance_uid)).is_valid:
        raise NotAUid(f"SOP Instance UID {str(sop_instance_uid)[:80]!r} is not a valid DICOM UID")
    with tempfile.TemporaryDirectory(dir=work) as folder:  # mode 0700, like the node's own
        yield Path(folder) / f"{sop_instance_uid}.dcm"


def keep_undelivered(result: Path, folder: Path) -> Path:
    """Move a result the PACS did not take into `folder` (made private, 0700) and name it in the log; its
    new path. A result of the same image kept before is replaced (the same model's result of it)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    kept = folder / result.name
    shutil.move(result, kept)
    log.error("result %s kept in %s: send it to the PACS when it takes it again", result.name, kept)
    return kept
