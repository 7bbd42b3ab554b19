"""`fedward serve PACKAGE --dicomweb URL`: pull new images from a PACS over DICOMweb, predict, store back.

Every `interval_s` it asks the PACS (QIDO-RS, the `dicomweb-client` library) for its instances, takes
those it has not handled yet, retrieves each (WADO-RS), predicts on it (client.predict: the package's
preprocessing, model, operating point and heat map) and stores the Structured Report and the heat-map
Secondary Capture into the image's study (STOW-RS).

What it has handled lives in a state file (JSON, written atomically: each instance's UID, what was
done and the UIDs of its stored results, not its prediction), so a restart neither repeats nor
skips an image. On the first start, the images already in the PACS are recorded as there before the
node and are not predicted (a node attached to a hospital's archive must not work through years of
studies), unless `backlog` is asked for. Reports and heat maps (fedward's own, and any SR, KO, PR or
SEG) are never predicted on. An image that cannot be used is recorded with its reason, logged, and not
tried again; one bad image never stops the poller. A PACS that cannot be reached is tried again at
the next poll, and the image with it.

Nothing of a patient stays behind: each retrieved image and its results live in a private temporary
folder of their own (client.serve_files) and are deleted when the image is done, whether its results
were stored, it failed, or the PACS went away (then the image is retrieved again at the next poll);
the poller's temporary folder goes with `close()`. Results the PACS refuses (an HTTP error, not an
absence; or an answer that does not list them as stored) are kept in the `undelivered` folder, the log
naming each, and the image is recorded as failed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from client.dicom_out import MANUFACTURER
from client.predict import Predictor
from client.serve_files import image_file, keep_undelivered, stop_on_sigterm, undelivered_folder
from common.files import write_atomic

log = logging.getLogger("fedward.serve")
NOT_IMAGES = {"SR", "KO", "PR", "SEG", "RTSTRUCT", "DOC"}
STUDY, SERIES, SOP, MODALITY, SERIES_DESCRIPTION = "0020000D", "0020000E", "00080018", "00080060", "0008103E"
PAGE = 500  # instances per QIDO-RS request


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _not_stored(answer: pydicom.Dataset, sent: list[pydicom.Dataset]) -> set[str]:
    """The SOP Instance UIDs of `sent` that a STOW-RS answer does not list as stored (PS3.18: stored
    ones are in its Referenced SOP Sequence, failed ones in its Failed SOP Sequence; Orthanc with a
    full disk lists neither). An answer without one (an empty body) stored nothing it says: all kept."""
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])
    }
    return {ds.SOPInstanceUID for ds in sent if ds.SOPInstanceUID not in stored}


class DicomWebPoller:
    """Polls the DICOMweb service at `url` (its root, e.g. http://pacs:8042/dicom-web)."""

    def __init__(
        self,
        package: str | Path,
        *,
        url: str,
        state: str | Path,
        backlog: bool = False,
        undelivered: str | Path = "fedward-undelivered",
    ):
        self.predictor = Predictor(package)
        self.client = DICOMwebClient(url)
        self.url, self.state_path, self.backlog = url, Path(state), backlog
        self.undelivered = undelivered_folder(undelivered)  # results the PACS refused, for the operator
        self.state = self._read_state()
        self.work = Path(tempfile.mkdtemp(prefix="fedward-dicomweb-"))  # private (0700): images in flight

    def close(self) -> None:
        """Delete the temporary folder (what is in it belongs to no image being served any more)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def _read_state(self) -> dict:
        if not self.state_path.exists():
            return {"url": self.url, "instances": {}, "started": False}
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"the DICOMweb state file {self.state_path} cannot be read ({err}): move it aside to start "
                "afresh (the images already in the PACS will then not be predicted)"
            ) from err
        if state.get("url") != self.url:
            raise RuntimeError(
                f"the state file {self.state_path} belongs to {state.get('url')}, not {self.url}: give "
                "each PACS its own --state file"
            )
        return state

    def _save_state(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state, indent=1))

    def instances(self) -> list[dict]:
        """Every instance the PACS lists (QIDO-RS), page by page, until a short page, or a page with
        no instance not listed before (a PACS that ignores the offset would repeat one forever)."""
        found, listed, offset = [], set(), 0
        while True:
            page = self.client.search_for_instances(
                fields=[MODALITY, SERIES_DESCRIPTION], limit=PAGE, offset=offset
            )
            new = [item for item in page if _value(item, SOP) not in listed]
            found += new
            listed.update(_value(item, SOP) for item in new)
            if page and not new:
                log.warning("the PACS %s repeated a page of its instances (it ignores QIDO-RS's offset): "
                            "only its first %d are seen", self.url, len(found))  # fmt: skip
            if len(page) < PAGE or not new:
                return found
            offset += PAGE

    def poll_once(self) -> list[dict]:
        """One pass: predict on every new image; what was done with each (also in the state file)."""
        seen, done = self.state["instances"], []
        first = not self.state["started"]
        for item in self.instances():
            uid = _value(item, SOP)
            if not uid or uid in seen:
                continue
            modality = _value(item, MODALITY).upper()
            if modality in NOT_IMAGES or _value(item, SERIES_DESCRIPTION).startswith(
                (MANUFACTURER, "CAUTION outside training")
            ):
                seen[uid] = {"status": "not an image to predict on", "modality": modality}
                continue
            if first and not self.backlog:
                seen[uid] = {"status": "in the PACS before the node started"}
                continue
            record = self._serve_one(_value(item, STUDY), _value(item, SERIES), uid)
            seen[uid] = {
                k: v for k, v in record.items() if k not in ("label", "warning")
            }  # no prediction kept
            done.append({"sop_instance_uid": uid, **record})
            self._save_state()  # after each image: a crash repeats none
        self.state["started"] = True
        self._save_state()
        return done

    def _serve_one(self, study: str, series: str, uid: str) -> dict:
        try:
            with image_file(self.work, uid) as path:  # the image and its results, then gone
                ds = self.client.retrieve_instance(study, series, uid)
                ds.save_as(path, enforce_file_format=True)
                return self._predict_and_store(study, uid, path)
        except (requests.ConnectionError, requests.Timeout):
            raise  # the PACS is away, not the image bad: the whole pass is tried again (run)
        except Exception as err:  # noqa: BLE001 - one bad image never stops the poller
            log.exception("image %s could not be served: %s", uid, err)
            return {"status": "failed", "error": str(err)}

    def _predict_and_store(self, study: str, uid: str, path: Path) -> dict:
        row = self.predictor.predict_file(path, None, dicom_out=path.parent / "out")
        if row.error:
            log.warning("image %s not predicted: %s", uid, row.error)
            return {"status": "failed", "error": row.error}
        if row.warning:
            log.warning("image %s is outside the model's training: %s", uid, row.warning)
        stored = [pydicom.dcmread(p) for p in row.dicom]
        for result in stored:  # its own results are never predicted on
            self.state["instances"][result.SOPInstanceUID] = {"status": "fedward result", "of": uid}
        try:
            answer = self.client.store_instances(stored, study_instance_uid=study)
            refused, reason = _not_stored(answer, stored), "not listed as stored in its STOW-RS answer"
        except (requests.ConnectionError, requests.Timeout):
            raise  # the PACS is away: the image is tried again at the next poll
        except Exception as err:  # noqa: BLE001 - refused (an HTTP error), or an answer not understood
            refused, reason = {r.SOPInstanceUID for r in stored}, f"{type(err).__name__}: {err}"
        if refused:  # kept for the operator, and the image not tried again
            kept = [str(keep_undelivered(Path(p), self.undelivered))
                    for p, r in zip(row.dicom, stored, strict=True) if r.SOPInstanceUID in refused]  # fmt: skip
            log.error("the PACS refused %d result(s) of image %s (%s)", len(kept), uid, reason)
            return {"status": "failed", "error": f"the PACS refused its results ({reason})", "kept": kept,
                    "stored": [r.SOPInstanceUID for r in stored if r.SOPInstanceUID not in refused]}  # fmt: skip
        return {"status": "predicted", "label": row.label, "warning": row.warning,
                "stored": [r.SOPInstanceUID for r in stored]}  # fmt: skip

    def run(self, interval_s: float, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception as err:  # noqa: BLE001 - the PACS away for a while: try again next time
                log.error(
                    "DICOMweb poll of %s failed (%s); trying again in %.0f s", self.url, err, interval_s
                )
            stop.wait(interval_s)


def serve_dicomweb(
    package: str | Path,
    *,
    url: str,
    state: str | Path,
    interval_s: float,
    backlog: bool,
    undelivered: str | Path = "fedward-undelivered",
) -> int:
    poller = DicomWebPoller(package, url=url, state=state, backlog=backlog, undelivered=undelivered)
    log.warning("fedward serve: polling %s every %.0f s; state in %s", url, interval_s, state)
    try:
        with stop_on_sigterm():
            poller.run(interval_s)
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()
    return 0
