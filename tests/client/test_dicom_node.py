"""`fedward serve`'s C-STORE node on loopback, with a real DICOM sender (pynetdicom) and no PACS to take
the results: they are kept in the undelivered folder, and nothing else of the image stays behind; an
image whose SOP Instance UID is not a UID (a name such as ../../x would write outside the node's
folder) is refused. The round trip with a PACS that takes the results is tests/e2e/test_pacs.py."""

from __future__ import annotations

import stat

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from client.dicom_node import CANNOT_UNDERSTAND, DicomNode
from client.serve_files import NotAUid, image_file
from common.models import build_model
from common.package import write_package
from server.processes import free_port

META = {"model": "cnn28", "in_channels": 1, "classes": ["normal", "finding"], "task": "classification",
        "input": {"size": [28, 28]}, "study": {"id": "node-test", "name": "node-test"}}  # fmt: skip


@pytest.fixture
def node(tmp_path):
    """A node whose PACS is away (a free port with nobody listening), its undelivered folder in tmp_path."""
    package = write_package(tmp_path / "model", build_model("cnn28", num_classes=2, seed=0), META)
    made = DicomNode(package, ae_title="FEDWARD", port=free_port(),
                     pacs=("127.0.0.1", free_port(), "AWAY"), undelivered=tmp_path / "undelivered")  # fmt: skip
    made.start()
    yield made
    made.stop()


def send(port: int, *datasets: pydicom.Dataset) -> list[int]:
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(CTImageStorage)
    assoc = sender.associate("127.0.0.1", port, ae_title="FEDWARD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_results_the_pacs_does_not_take_are_kept_and_nothing_else_stays(node, tmp_path):
    image = pydicom.dcmread(get_testdata_file("CT_small.dcm"))

    assert send(node.port, image) == [0]  # received and served; only the delivery failed

    (record,) = node.handled
    assert record["sent"] == [-1, -1]  # the SR and the heat map: no association
    kept = sorted((tmp_path / "undelivered").iterdir())
    assert [p.name for p in kept] == [f"{image.SOPInstanceUID}-sc.dcm", f"{image.SOPInstanceUID}-sr.dcm"]
    assert sorted(record["kept"]) == [str(p) for p in kept]
    sr = pydicom.dcmread(kept[1])  # a whole report, ready to send on, citing the image
    cited = (
        sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    )
    assert cited.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert list(node.work.rglob("*")) == []  # no copy of the image, no result, while the node runs on
    work = node.work
    node.stop()
    assert not work.exists()


def test_a_sop_instance_uid_that_is_not_a_uid_is_refused_and_writes_nothing(node, tmp_path):
    escaping = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    escaping.SOPInstanceUID = "../../escaping"  # as the file name it was: outside the node's folder
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))

    assert send(node.port, escaping, good) == [CANNOT_UNDERSTAND, 0]  # refused; the next one served

    assert "not a valid DICOM UID" in node.handled[0]["error"]
    # where ../../escaping.dcm from the image's folder, or from the node's (as it was), would land
    assert (
        not (node.work.parent / "escaping.dcm").exists()
        and not (node.work.parent.parent / "escaping.dcm").exists()
    )
    assert list(node.work.rglob("*")) == []
    assert len(list((tmp_path / "undelivered").iterdir())) == 2  # the good image's results only


@pytest.mark.parametrize("uid", ["../x", "1.2.3/4", "", "1." + "2" * 70, "1.02.3"])
def test_image_file_refuses_what_is_not_a_uid(tmp_path, uid):
    with pytest.raises(NotAUid, match="not a valid DICOM UID"):
        with image_file(tmp_path, uid):
            pass
    assert list(tmp_path.iterdir()) == []


def test_image_file_is_removed_with_its_results_whatever_happens(tmp_path):
    with pytest.raises(RuntimeError, match="prediction failed"):
        with image_file(tmp_path, "1.2.840.10008.1") as path:
            path.write_bytes(b"an image")
            (path.parent / "out").mkdir()
            (path.parent / "out" / "result.dcm").write_bytes(b"a result")
            assert path.name == "1.2.840.10008.1.dcm" and path.parent.parent == tmp_path
            raise RuntimeError("prediction failed")
    assert list(tmp_path.iterdir()) == []


def test_a_result_the_pacs_has_no_context_for_is_kept_and_the_other_sent(tmp_path):
    """A PACS (a pynetdicom storage SCP here) that takes Secondary Captures but not Structured Reports:
    pynetdicom raises on sending the report; the report is kept, the heat map stored."""
    from pynetdicom import evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    stored: list[str] = []
    pacs = AE(ae_title="PICKY")
    pacs.add_supported_context(SecondaryCaptureImageStorage)
    pacs_port = free_port()

    def take(event):
        stored.append(str(event.dataset.SOPClassUID))
        return 0x0000

    server = pacs.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, take)])
    package = write_package(tmp_path / "model", build_model("cnn28", num_classes=2, seed=0), META)
    node = DicomNode(package, ae_title="FEDWARD", port=free_port(), pacs=("127.0.0.1", pacs_port, "PICKY"),
                     undelivered=tmp_path / "undelivered")  # fmt: skip
    node.start()
    try:
        image = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert send(node.port, image, image) == [0, 0]  # the same image twice: nothing kept is replaced
    finally:
        node.stop()
        server.shutdown()

    assert [r["sent"] for r in node.handled] == [
        [-1, 0],
        [-1, 0],
    ]  # the report: no context; the heat map: stored
    assert stored == [str(SecondaryCaptureImageStorage)] * 2
    assert sorted(p.name for p in (tmp_path / "undelivered").iterdir()) == [
        f"{image.SOPInstanceUID}-sr-2.dcm", f"{image.SOPInstanceUID}-sr.dcm"
    ]  # fmt: skip
    assert not node.work.exists()


def test_an_undelivered_folder_that_cannot_be_written_stops_the_node_at_its_start(tmp_path):
    from client.serve_files import UndeliveredFolderError

    package = write_package(tmp_path / "model", build_model("cnn28", num_classes=2, seed=0), META)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UndeliveredFolderError, match="a-file.*cannot be written.*--undelivered"):
        DicomNode(package, ae_title="FEDWARD", port=free_port(), pacs=("127.0.0.1", free_port(), "AWAY"),
                  undelivered=tmp_path / "a-file")  # fmt: skip


def test_an_undelivered_folder_every_user_may_read_stops_the_node_and_a_group_one_does_not(tmp_path):
    """The results kept there name patients; a folder an operator made with the usual 0755 would show
    them to every account on the machine."""
    from client.serve_files import UndeliveredFolderError, undelivered_folder

    package = write_package(tmp_path / "model", build_model("cnn28", num_classes=2, seed=0), META)
    shared, group = tmp_path / "shared", tmp_path / "group"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(
        UndeliveredFolderError, match=r"shared, is open to every user.*mode 0755.*chmod o-rwx"
    ):
        DicomNode(package, ae_title="FEDWARD", port=free_port(), pacs=("127.0.0.1", free_port(), "AWAY"),
                  undelivered=shared)  # fmt: skip
    group.mkdir()
    group.chmod(0o770)
    assert undelivered_folder(group) == group  # the operator's group may share it
    made = undelivered_folder(tmp_path / "new" / "undelivered")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
