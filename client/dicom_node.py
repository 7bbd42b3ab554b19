"""`fedward serve PACKAGE`: a DICOM node beside the PACS (pynetdicom).

It accepts images by C-STORE, predicts on each (client.predict: the package's preprocessing, model,
operating point and heat map), and stores the results back to the PACS by C-STORE: the Structured
Report and the heat-map Secondary Capture (client.dicom_out), in the image's study; a segmentation
package's result is a DICOM-SEG of the predicted mask over the image. An image it
cannot use (no pixels, corrupt) gets a failure status (0xC210, "cannot understand") and a line in the
log naming it; the service goes on. A result the PACS refuses is logged; the service goes on. An image
outside the model's training (another modality: a CT sent to a chest X-ray model) is predicted, its
report marked "outside training", and logged.

Nothing of a patient stays behind: each received image and its results live in a private temporary
folder of their own while the image is served and are deleted with it. Only results the PACS did not
take (a failure status, no association, an association that broke) are kept, in the `undelivered`
folder (the log names each), for the operator to send on; the node's temporary folder goes when it
stops (Ctrl-C or SIGTERM), after the images being served are done.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import deque
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from client.predict import Predictor
from client.serve_files import NotAUid, image_file, keep_undelivered, stop_on_sigterm, undelivered_folder

log = logging.getLogger("fedward.serve")
CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700  # what a node that is stopping answers
HANDLED_KEPT = 1000


class DicomNode:
    """The node: `ae_title` listening on `port`, sending results to the PACS at `pacs` (host, port, AE title)."""

    def __init__(
        self,
        package: str | Path,
        *,
        ae_title: str,
        port: int,
        pacs: tuple[str, int, str],
        host: str = "127.0.0.1",
        undelivered: str | Path = "fedward-undelivered",
        senders: list[str] | None = None,
    ):
        """`senders`: the calling AE titles it takes images from (an association from any other is
        rejected); None: any, which `fedward serve` never passes (the PACS's own title, and those of
        `--allow-aet`)."""
        self.predictor = Predictor(package)
        self.ae_title, self.host, self.port, self.pacs = ae_title, host, port, pacs
        self.undelivered = undelivered_folder(undelivered)  # results the PACS did not take, for the operator
        self.work = Path(tempfile.mkdtemp(prefix="fedward-serve-"))  # private (0700): images in flight
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.require_calling_aet = list(senders or [])  # pynetdicom: empty means any
        for sop in (
            Comprehensive3DSRStorage,
            SecondaryCaptureImageStorage,
            SegmentationStorage,
        ):  # what it sends
            self.ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = None
        # the latest received images (a bounded record for the node's whole life): each one's SOP
        # Instance UID, status, and what became of its results
        self.handled: deque[dict] = deque(maxlen=HANDLED_KEPT)
        self.stopping, self._serving, self._idle = False, 0, threading.Condition()

    def start(self, block: bool = False):
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self.server = self.ae.start_server((self.host, self.port), block=block, evt_handlers=handlers)
        return self.server

    def stop(self, wait_s: float = 60.0) -> None:
        """Stop listening and abort the open associations, wait (up to `wait_s`) for the images being
        served to be done, then delete the temporary folder. Stopping twice is stopping once."""
        with self._idle:
            self.stopping = True
        self.ae.shutdown()
        self.server = None
        with self._idle:
            self._idle.wait_for(lambda: self._serving == 0, timeout=wait_s)
        shutil.rmtree(self.work, ignore_errors=True)

    def _on_store(self, event) -> int:
        """One image in, its results out; any failure is this image's failure status only."""
        with self._idle:
            if self.stopping:
                return OUT_OF_RESOURCES
            self._serving += 1
        try:
            return self._serve_one(event)
        except Exception as err:  # noqa: BLE001 - one bad image never stops the node
            if isinstance(err, NotAUid):  # the sender's mistake, not the node's: no traceback
                log.warning("an image was refused: %s", err)
            else:
                log.exception("an image could not be served: %s", err)
            self.handled.append({"sop_instance_uid": "", "status": CANNOT_UNDERSTAND, "error": str(err)})
            return CANNOT_UNDERSTAND
        finally:
            with self._idle:
                self._serving -= 1
                self._idle.notify_all()

    def _serve_one(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with image_file(self.work, ds.SOPInstanceUID) as path:  # the image and its results, then gone
            ds.save_as(path, enforce_file_format=True)
            return self._predict_and_send(ds, path)

    def _predict_and_send(self, ds: pydicom.Dataset, path: Path) -> int:
        row = self.predictor.predict_file(path, None, dicom_out=path.parent / "out")
        if row.error:
            log.warning("image %s refused: %s", ds.SOPInstanceUID, row.error)
            self.handled.append(
                {"sop_instance_uid": ds.SOPInstanceUID, "status": CANNOT_UNDERSTAND, "error": row.error}
            )
            return CANNOT_UNDERSTAND
        if row.warning:  # predicted and stored all the same, the report marked (client.dicom_out)
            log.warning("image %s is outside the model's training: %s", ds.SOPInstanceUID, row.warning)
        files = [Path(p) for p in row.dicom]
        sent = self.send(files)
        kept = [
            str(keep_undelivered(f, self.undelivered))
            for f, status in zip(files, sent, strict=True)
            if not stored(status)
        ]
        self.handled.append(
            {"sop_instance_uid": ds.SOPInstanceUID, "status": 0, "label": row.label, "sent": sent,
             "kept": kept, "warning": row.warning}
        )  # fmt: skip
        return 0x0000

    def send(self, files: list[Path]) -> list[int]:
        """C-STORE `files` to the PACS; each file's status (-1: no association, or no answer)."""
        host, port, title = self.pacs
        assoc = self.ae.associate(host, port, ae_title=title)
        if not assoc.is_established:
            log.error("the PACS %s at %s:%d did not accept an association", title, host, port)
            return [-1] * len(files)
        try:
            statuses = []
            for f in files:
                try:
                    status = assoc.send_c_store(pydicom.dcmread(f))
                except (ValueError, RuntimeError, OSError) as err:  # no context for it; the association broke
                    log.error("%s could not be sent to the PACS (%s)", f.name, err)
                    statuses.append(-1)
                    continue
                statuses.append(int(status.Status) if status else -1)
                if not stored(statuses[-1]):
                    log.error("the PACS did not store %s (status %s)", f.name,
                              f"0x{statuses[-1]:04X}" if status else "none: no answer")  # fmt: skip
            return statuses
        finally:
            assoc.release()


def stored(status: int) -> bool:
    """Whether a C-STORE status (-1: none came) says the PACS stored the object: success, or a warning
    (0xB000, 0xB006, 0xB007: stored, some elements coerced or discarded)."""
    return status >= 0 and code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def serve(
    package: str | Path,
    *,
    ae_title: str,
    port: int,
    pacs: tuple[str, int, str],
    undelivered: str | Path = "fedward-undelivered",
    host: str = "127.0.0.1",
    also_from: list[str] | None = None,
) -> int:
    """The node of `fedward serve`: images from the PACS's AE title and those `also_from` names only."""
    senders = [pacs[2], *(also_from or [])]
    node = DicomNode(package, ae_title=ae_title, port=port, pacs=pacs, undelivered=undelivered, host=host,
                     senders=senders)  # fmt: skip
    log.warning(
        "fedward serve: %s listening on %s:%d for images from %s; results go to %s at %s:%d (those it "
        "does not take: %s)",
        ae_title,
        host,
        port,
        ", ".join(senders),
        pacs[2],
        pacs[0],
        pacs[1],
        undelivered,
    )
    try:
        with stop_on_sigterm():
            node.start(block=True)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0
