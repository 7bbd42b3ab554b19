"""Where `fedward serve` keeps an image while it serves it: a private temporary folder of its own, under
the node's, deleted with everything in it when the image is done (client.dicom_node, the C-STORE node;
client.dicomweb_poller, the DICOMweb one). So no copy of a patient's image, and no result already in
the PACS, outlives its serving. Results the PACS did not take are moved to the operator's undelivered
folder first (`keep_undelivered`), to be sent on, not lost. And both nodes stop on SIGTERM as on Ctrl-C
(`stop_on_sigterm`), so that their temporary folders go with them."""

from __future__ import annotations

import logging
import shutil
import signal
import stat
import tempfile
import threading
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


class UndeliveredFolderError(RuntimeError):
    """The undelivered folder cannot be made or written."""


def undelivered_folder(path: str | Path) -> Path:
    """The folder for results the PACS does not take, made (private, 0700) and checked writable when
    the node starts, so that a result is never lost to a folder that cannot take it. A folder that
    exists already may be shared with the operator's group, not with every user of the machine: the
    results name patients and their findings."""
    folder = Path(path)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder)  # noqa: SIM115 - closed (and removed) at once
        probe.close()
        mode = stat.S_IMODE(folder.stat().st_mode)
    except OSError as err:
        raise UndeliveredFolderError(
            f"the folder for results the PACS does not take, {folder.resolve()}, cannot be written "
            f"({err.strerror or err}): give --undelivered a folder this user can write"
        ) from None
    if mode & 0o007:
        raise UndeliveredFolderError(
            f"the folder for results the PACS does not take, {folder.resolve()}, is open to every user of "
            f"this machine (mode {mode:04o}) and the results it keeps name patients: `chmod o-rwx` it, or "
            "give --undelivered another folder (fedward makes a new one private)"
        )
    return folder


def keep_undelivered(result: Path, folder: Path) -> Path:
    """Move a result the PACS did not take into `folder` and name it in the log; its new path. A name
    already there (the same image's result kept before) gets a number: nothing kept is replaced."""
    kept, n = folder / result.name, 1
    while kept.exists():
        n += 1
        kept = folder / f"{result.stem}-{n}{result.suffix}"
    shutil.move(result, kept)
    log.error("result %s kept in %s: send it to the PACS when it takes it again", result.name, kept)
    return kept


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a service manager's stop) as Ctrl-C: the node's `finally` runs and its temporary
    folder goes. In the main thread only (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
