"""`fedward serve PACKAGE`: a DICOM node beside the PACS (pynetdicom).

It accepts images by C-STORE, predicts on each (client.predict: the package's preprocessing, model,
operating point and heat map), and stores the results back to the PACS by C-STORE: the Structured
Report and the heat-map Secondary Capture (client.dicom_out), in the image's study; a segmentation
package's result is a DICOM-SEG of the predicted mask over the image. An image it
cannot use (no pixels, corrupt) gets a failure status (0xC210, "cannot understand") and a line in the
log naming it; the service goes on. A result the PACS refuses is logged; the service goes on. An image
outside the model's training (another modality: a CT sent to a chest X-ray model) is predicted, its
report marked "outside training", and logged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

from client.predict import Predictor

log = logging.getLogger("fedward.serve")
CANNOT_UNDERSTAND = 0xC210


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
    ):
        self.predictor = Predictor(package)
        self.ae_title, self.host, self.port, self.pacs = ae_title, host, port, pacs
        self.work = Path(tempfile.mkdtemp(prefix="fedward-serve-"))
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        for sop in (
            Comprehensive3DSRStorage,
            SecondaryCaptureImageStorage,
            SegmentationStorage,
        ):  # what it sends
            self.ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = None
        self.handled: list[dict] = []  # per received image: its SOP Instance UID, status, results sent

    def start(self, block: bool = False):
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self.server = self.ae.start_server((self.host, self.port), block=block, evt_handlers=handlers)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _on_store(self, event) -> int:
        """One image in, its results out; any failure is this image's failure status only."""
        try:
            return self._serve_one(event)
        except Exception as err:  # noqa: BLE001 - one bad image never stops the node
            log.exception("an image could not be served: %s", err)
            self.handled.append({"sop_instance_uid": "", "status": CANNOT_UNDERSTAND, "error": str(err)})
            return CANNOT_UNDERSTAND

    def _serve_one(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.work / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        row = self.predictor.predict_file(path, None, dicom_out=self.work / "out")
        if row.error:
            log.warning("image %s refused: %s", ds.SOPInstanceUID, row.error)
            self.handled.append(
                {"sop_instance_uid": ds.SOPInstanceUID, "status": CANNOT_UNDERSTAND, "error": row.error}
            )
            return CANNOT_UNDERSTAND
        if row.warning:  # predicted and stored all the same, the report marked (client.dicom_out)
            log.warning("image %s is outside the model's training: %s", ds.SOPInstanceUID, row.warning)
        sent = self.send([Path(p) for p in row.dicom])
        self.handled.append(
            {"sop_instance_uid": ds.SOPInstanceUID, "status": 0, "label": row.label, "sent": sent,
             "warning": row.warning}
        )  # fmt: skip
        return 0x0000

    def send(self, files: list[Path]) -> list[int]:
        """C-STORE `files` to the PACS; each file's status (-1: no association)."""
        import pydicom

        host, port, title = self.pacs
        assoc = self.ae.associate(host, port, ae_title=title)
        if not assoc.is_established:
            log.error(
                "the PACS %s at %s:%d did not accept an association; results kept in %s",
                title,
                host,
                port,
                self.work,
            )
            return [-1] * len(files)
        try:
            statuses = []
            for f in files:
                status = assoc.send_c_store(pydicom.dcmread(f))
                statuses.append(int(status.Status) if status else -1)
                if not status or status.Status != 0:
                    log.error("the PACS refused %s (status %s)", f, status.Status if status else "none")
            return statuses
        finally:
            assoc.release()


def serve(package: str | Path, *, ae_title: str, port: int, pacs: tuple[str, int, str]) -> int:
    node = DicomNode(package, ae_title=ae_title, port=port, pacs=pacs)
    log.warning(
        "fedward serve: %s listening on port %d; results go to %s at %s:%d",
        ae_title,
        port,
        pacs[2],
        pacs[0],
        pacs[1],
    )
    try:
        node.start(block=True)
    except KeyboardInterrupt:
        node.stop()
    return 0
