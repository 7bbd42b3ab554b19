"""The PACS round trip against a real Orthanc (Debian's package, with its DICOMweb plugin), on free
loopback ports: an image pushed into Orthanc is sent to `fedward serve` (C-STORE) or pulled by it
(DICOMweb), which stores a Structured Report and a heat-map Secondary Capture back into the image's
study; a file without pixels gets a failure status, and the node goes on; nothing of an image stays
in the node's folder; results an Orthanc with a full disk does not store are kept, to send on; the
`fedward serve` command rejects other AE titles than the PACS's and leaves nothing on SIGTERM."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from client.dicom_node import CANNOT_UNDERSTAND, DicomNode
from server.processes import free_port
from tests.client.test_predict import package  # noqa: F401 - the packaged model fixture
from tests.conftest import ROOT
from tests.reliability.runs import small_disk

pytestmark = pytest.mark.slow
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


def _rest(base: str, path: str, data: bytes | None = None, method: str | None = None):
    req = urllib.request.Request(
        base + path, data=data, method=method or ("POST" if data is not None else "GET")
    )
    with urllib.request.urlopen(req, timeout=30) as reply:
        body = reply.read()
    return json.loads(body) if body else None


def _start_orthanc(folder, **extra):
    """A real Orthanc on free ports that knows `fedward serve` as modality 'fedward'; `extra`: more of
    its configuration. Yields its REST base, DICOM port and the node's port; stopped afterwards."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    http, dicom, node = free_port(), free_port(), free_port()
    config = {"Name": "fedward-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomModalities": {"fedward": ["FEDWARD", "127.0.0.1", node]},
              "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [DICOMWEB_PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **extra}  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [binary, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{http}"
    deadline = time.time() + 30
    while True:
        try:
            _rest(base, "/system")
            break
        except OSError as err:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(
                    f"Orthanc ({binary}) did not start: install Debian's orthanc and orthanc-dicomweb "
                    "(make test does)"
                ) from err
            time.sleep(0.2)
    yield {"base": base, "dicom": dicom, "node": node}
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def orthanc(tmp_path):
    yield from _start_orthanc(tmp_path)


@pytest.fixture
def orthanc_on_a_small_disk(tmp_path):
    """An Orthanc whose images are stored on a file system of 1 MB (a tmpfs, needs root as `make test`
    runs), so that a test can fill it; its index lives elsewhere, so it still answers queries."""
    storage = tmp_path / "storage"
    storage.mkdir()
    with small_disk(storage, "1m"):
        yield from _start_orthanc(
            tmp_path, StorageDirectory=str(storage), IndexDirectory=str(tmp_path / "index")
        )


def test_an_image_sent_from_orthanc_comes_back_with_a_report_and_a_heat_map(orthanc, package, tmp_path):  # noqa: F811
    node = DicomNode(package, ae_title="FEDWARD", port=orthanc["node"],
                     pacs=("127.0.0.1", orthanc["dicom"], "ORTHANC"), undelivered=tmp_path / "undelivered")  # fmt: skip
    node.start()
    try:
        source = get_testdata_file("CT_small.dcm")
        pushed = _rest(orthanc["base"], "/instances", open(source, "rb").read())
        job = _rest(
            orthanc["base"],
            "/modalities/fedward/store",
            json.dumps({"Resources": [pushed["ID"]], "Synchronous": True}).encode(),
        )
        assert job is not None
        deadline = time.time() + 60
        while len(_rest(orthanc["base"], "/instances")) < 3 and time.time() < deadline:
            time.sleep(0.2)
        study = _rest(orthanc["base"], f"/studies/{pushed['ParentStudy']}/instances")
        modalities = sorted(
            _rest(orthanc["base"], f"/instances/{i['ID']}/simplified-tags")["Modality"] for i in study
        )
        assert modalities == ["CT", "OT", "SR"], (
            modalities
        )  # the image, its heat map (Secondary Capture), its report
        sr_id = next(
            i["ID"]
            for i in study
            if _rest(orthanc["base"], f"/instances/{i['ID']}/simplified-tags")["Modality"] == "SR"
        )
        sr_path = tmp_path / "sr.dcm"
        with urllib.request.urlopen(f"{orthanc['base']}/instances/{sr_id}/file") as reply:
            sr_path.write_bytes(reply.read())
        sr = pydicom.dcmread(sr_path)
        cited = (
            sr.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
        )
        assert cited.ReferencedSOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID
        assert node.handled[-1]["status"] == 0 and node.handled[-1]["sent"] == [0, 0]
        assert node.handled[-1]["kept"] == [] and list((tmp_path / "undelivered").iterdir()) == []
        assert list(node.work.rglob("*")) == []  # the image and its results, once in the PACS: gone
    finally:
        node.stop()
    assert not node.work.exists()


def test_an_image_without_pixels_gets_a_failure_status_and_the_node_goes_on(orthanc, package, tmp_path):  # noqa: F811
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    node = DicomNode(package, ae_title="FEDWARD", port=orthanc["node"],
                     pacs=("127.0.0.1", orthanc["dicom"], "ORTHANC"), undelivered=tmp_path / "undelivered")  # fmt: skip
    node.start()
    try:
        sender = AE(ae_title="MODALITY")
        sender.add_requested_context(CTImageStorage)
        good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        bad = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        del bad.PixelData
        bad.SOPInstanceUID = pydicom.uid.generate_uid()
        assoc = sender.associate("127.0.0.1", orthanc["node"], ae_title="FEDWARD")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (bad, good)]
        assoc.release()
        assert statuses == [CANNOT_UNDERSTAND, 0]  # the bad one refused, the next one served
        assert "pixel" in node.handled[0]["error"].lower()
    finally:
        node.stop()


def _modalities(base: str, study: str) -> list[str]:
    found = _rest(base, f"/studies/{study}/instances")
    return sorted(_rest(base, f"/instances/{i['ID']}/simplified-tags")["Modality"] for i in found)


def _push(base: str, ds: pydicom.Dataset, tmp_path) -> dict:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _rest(base, "/instances", path.read_bytes())


def fill(folder) -> Path:
    """Fill the file system `folder` is on; the file that fills it."""
    filler = folder / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    return filler


def test_new_images_are_pulled_over_dicomweb_and_their_results_stored_back(orthanc, package, tmp_path):  # noqa: F811
    from client.dicomweb_poller import DicomWebPoller

    base, state = orthanc["base"], tmp_path / "state.json"
    before = _push(base, pydicom.dcmread(get_testdata_file("CT_small.dcm")), tmp_path)
    poller = DicomWebPoller(
        package, url=f"{base}/dicom-web", state=state, undelivered=tmp_path / "undelivered"
    )
    assert poller.poll_once() == []  # what the PACS held before the node started is left alone

    new = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    no_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()
    new_id = _push(base, new, tmp_path)
    _push(base, no_pixels, tmp_path)
    done = {d["sop_instance_uid"]: d for d in poller.poll_once()}
    assert set(done) == {new.SOPInstanceUID, no_pixels.SOPInstanceUID}
    assert done[new.SOPInstanceUID]["status"] == "predicted", done
    assert (
        done[no_pixels.SOPInstanceUID]["status"] == "failed"
        and "pixel" in done[no_pixels.SOPInstanceUID]["error"].lower()
    )
    assert _modalities(base, new_id["ParentStudy"]) == [
        "MR",
        "OT",
        "SR",
    ]  # the image, its heat map, its report
    assert _modalities(base, before["ParentStudy"]) == ["CT", "CT"]  # the old image and the bad one only

    assert list(poller.work.rglob("*")) == []  # served or failed, no copy of an image stays behind
    recorded = json.loads(state.read_text())["instances"][new.SOPInstanceUID]
    assert recorded["status"] == "predicted" and "label" not in recorded  # what was done, not the finding

    assert poller.poll_once() == []  # its own results are not predicted on, nothing is done twice
    poller.close()
    assert not poller.work.exists()
    again = DicomWebPoller(package, url=f"{base}/dicom-web", state=state,
                           undelivered=tmp_path / "undelivered")  # a restart, from the state file  # fmt: skip
    assert again.poll_once() == [] and len(_rest(base, "/instances")) == 5
    again.close()


def test_a_segmentation_package_stores_a_dicom_seg_of_the_image_in_its_study(orthanc, tmp_path):
    from common.package import write_package
    from tests.client.test_segmentation import _site, _trained

    meta = {"model": "unet", "task": "segmentation", "in_channels": 1, "classes": ["background", "lesion"],
            "input": {"preprocess": {"size": [28, 28], "spatial": "resize", "channels": 1}}}  # fmt: skip
    seg_package = write_package(tmp_path / "model", _trained(_site(tmp_path / "site")), meta)
    node = DicomNode(seg_package, ae_title="FEDWARD", port=orthanc["node"],
                     pacs=("127.0.0.1", orthanc["dicom"], "ORTHANC"), undelivered=tmp_path / "undelivered")  # fmt: skip
    node.start()
    try:
        source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        pushed = _push(orthanc["base"], source, tmp_path)
        _rest(orthanc["base"], "/modalities/fedward/store",
              json.dumps({"Resources": [pushed["ID"]], "Synchronous": True}).encode())  # fmt: skip
        deadline = time.time() + 60
        while len(_rest(orthanc["base"], "/instances")) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert _modalities(orthanc["base"], pushed["ParentStudy"]) == ["CT", "SEG"]  # the image, its mask
        assert node.handled[-1]["status"] == 0 and node.handled[-1]["sent"] == [0], node.handled
        seg_id = next(i["ID"] for i in _rest(orthanc["base"], f"/studies/{pushed['ParentStudy']}/instances")
                      if _rest(orthanc["base"], f"/instances/{i['ID']}/simplified-tags")["Modality"] == "SEG")  # fmt: skip
        with urllib.request.urlopen(f"{orthanc['base']}/instances/{seg_id}/file") as reply:
            seg = pydicom.dcmread(io.BytesIO(reply.read()))
        cited = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert cited == source.SOPInstanceUID and seg.SegmentSequence[0].SegmentLabel == "lesion"
    finally:
        node.stop()


def test_results_a_full_pacs_does_not_store_over_dicomweb_are_kept(
    orthanc_on_a_small_disk,
    package,  # noqa: F811
    tmp_path,
):
    from dicomweb_client import DICOMwebClient

    from client.dicomweb_poller import DicomWebPoller

    base, undelivered = orthanc_on_a_small_disk["base"], tmp_path / "undelivered"
    poller = DicomWebPoller(package, url=f"{base}/dicom-web", state=tmp_path / "state.json",
                            undelivered=undelivered)  # fmt: skip
    assert poller.poll_once() == []
    image = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pushed = _push(base, image, tmp_path)
    filler = fill(tmp_path / "storage")  # the PACS's disk

    (done,) = poller.poll_once()  # the image retrieved and predicted; its results not stored

    assert done["status"] == "failed" and "refused" in done["error"], done
    names = [f"{image.SOPInstanceUID}-sc.dcm", f"{image.SOPInstanceUID}-sr.dcm"]
    assert sorted(p.name for p in undelivered.iterdir()) == names
    assert sorted(done["kept"]) == [str(undelivered / n) for n in names] and done["stored"] == []
    assert _modalities(base, pushed["ParentStudy"]) == ["MR"]
    assert list(poller.work.rglob("*")) == []  # nothing of the image stays behind
    assert poller.poll_once() == []  # recorded: not tried again
    poller.close()

    filler.unlink()  # the PACS has room again: what was kept is whole and goes in as it is
    kept = [pydicom.dcmread(undelivered / n) for n in names]
    DICOMwebClient(f"{base}/dicom-web").store_instances(kept, study_instance_uid=image.StudyInstanceUID)
    assert _modalities(base, pushed["ParentStudy"]) == ["MR", "OT", "SR"]


def test_results_a_full_pacs_does_not_store_by_c_store_are_kept(
    orthanc_on_a_small_disk,
    package,  # noqa: F811
    tmp_path,
):
    pacs, undelivered = orthanc_on_a_small_disk, tmp_path / "undelivered"
    node = DicomNode(package, ae_title="FEDWARD", port=pacs["node"], pacs=("127.0.0.1", pacs["dicom"], "ORTHANC"),
                     undelivered=undelivered)  # fmt: skip
    node.start()
    try:
        image = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        pushed = _push(pacs["base"], image, tmp_path)
        fill(tmp_path / "storage")
        _rest(pacs["base"], "/modalities/fedward/store",
              json.dumps({"Resources": [pushed["ID"]], "Synchronous": True}).encode())  # fmt: skip
        deadline = time.time() + 60
        while not node.handled and time.time() < deadline:
            time.sleep(0.2)
        (record,) = node.handled
        assert record["status"] == 0 and all(status not in (0, -1) for status in record["sent"]), record
        names = [f"{image.SOPInstanceUID}-sc.dcm", f"{image.SOPInstanceUID}-sr.dcm"]
        assert sorted(p.name for p in undelivered.iterdir()) == names
        assert sorted(record["kept"]) == [str(undelivered / n) for n in names]
        assert _modalities(pacs["base"], pushed["ParentStudy"]) == ["CT"]
        assert list(node.work.rglob("*")) == []
    finally:
        node.stop()


def test_the_serve_command_takes_images_from_the_pacs_only_and_leaves_nothing_on_sigterm(
    orthanc,
    package,  # noqa: F811
    tmp_path,
):
    """`fedward serve` as a hospital runs it: Orthanc's images come back with their report; an
    association from another AE title (not given with --allow-aet) is rejected; SIGTERM (a service
    manager's stop) ends it with its temporary folder gone."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    own_tmp = tmp_path / "tmp"  # where the node makes its temporary folder (TMPDIR)
    own_tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", str(package), "--port", str(orthanc["node"]),
         "--pacs", f"127.0.0.1:{orthanc['dicom']}@ORTHANC", "--undelivered", str(tmp_path / "undelivered")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(own_tmp)},
    )  # fmt: skip
    try:
        stranger = AE(ae_title="MODALITY")
        stranger.add_requested_context(CTImageStorage)
        deadline = time.time() + 60
        while True:  # until the node listens: then its answer to a stranger is a rejection
            assoc = stranger.associate("127.0.0.1", orthanc["node"], ae_title="FEDWARD")
            if assoc.is_rejected or assoc.is_established or time.time() > deadline:
                break
            time.sleep(0.5)
        assert assoc.is_rejected, "an association from an AE title it was not given must be rejected"

        pushed = _push(orthanc["base"], pydicom.dcmread(get_testdata_file("CT_small.dcm")), tmp_path)
        _rest(orthanc["base"], "/modalities/fedward/store",
              json.dumps({"Resources": [pushed["ID"]], "Synchronous": True}).encode())  # fmt: skip
        deadline = time.time() + 60
        while len(_modalities(orthanc["base"], pushed["ParentStudy"])) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert _modalities(orthanc["base"], pushed["ParentStudy"]) == ["CT", "OT", "SR"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert list(own_tmp.iterdir()) == []  # its temporary folder went with it
