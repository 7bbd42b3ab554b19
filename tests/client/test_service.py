"""The site service and the forwarder over a real Unix socket: real Flower Messages in, the site's
own training path behind it; garbage, hang-ups and restarts do not hurt the site."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import save

import client.service
from client.forwarder import SiteUnreachableError, ask, forward
from client.ledger import SiteAccountant
from client.service import ServiceError, SiteService, serve
from client.wire import MAGIC, send_frame
from common.keys import Met, Rec, Site
from common.models import build_model
from common.privacy import request_config
from common.schema import PrivacyConfig, SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig
from tests.plans import round_config


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _site(tmp_path) -> SiteConfig:
    data = SiteDataConfig(format="synthetic", synthetic=SyntheticConfig(train_per_site=48, test_per_site=16))
    return SiteConfig(
        site="hospital-a",
        data=data,
        privacy=SitePolicyConfig(max_epsilon=50),
        state_dir=str(tmp_path / "state"),
    )


class Running:
    """A site service in a thread of this process, on a socket in tmp_path."""

    def __init__(self, site: SiteConfig, path):
        self.service = SiteService(site, path=path)
        self.service.open()
        self.thread = threading.Thread(target=self.service.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(10)


@pytest.fixture
def running(tmp_path):
    service = Running(_site(tmp_path), tmp_path / "sock" / "site.sock")
    yield service
    service.stop()


def _message(kind: str, private: bool = True) -> Message:
    config = round_config(dp_enabled=private, batch_size=16)
    if private:
        config |= request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0))
    content = RecordDict(
        {Rec.ARRAYS: ArrayRecord(build_model("cnn28").state_dict()), Rec.CONFIG: ConfigRecord(config)}
    )
    return Message(content, dst_node_id=1, message_type=kind)


def test_the_forwarder_trains_and_evaluates_through_the_service(running):
    path = str(running.service.path)
    trained = forward(_message(MessageType.TRAIN), path, "train").content
    evaluated = forward(_message(MessageType.EVALUATE), path, "evaluate").content

    assert trained[Rec.SITE][Site.NAME] == "hospital-a" and trained[Rec.SITE][Site.REFUSED] == ""
    sent = build_model("cnn28").state_dict()
    back = trained[Rec.ARRAYS].to_torch_state_dict()
    assert list(back) == list(sent) and all(back[k].shape == sent[k].shape for k in sent)
    assert trained[Rec.METRICS][Met.EPSILON] > 0
    assert evaluated[Rec.SITE][Site.RELEASE] == "dp_histogram"  # a hospital's default: protected
    assert len(evaluated[Rec.METRICS][Met.SCORE_HIST]) == 2 * 16  # positives and the rest, 16 bins
    # the service's ledger, not the forwarder, holds the spending
    kinds = [e.kind for e in SiteAccountant(running.service.config.state_dir).ledger.entries()]
    assert kinds == ["count", "train", "evaluation"]


def test_an_unbounded_epsilon_crosses_the_socket_as_infinity(tmp_path):
    """After a round without privacy the site reports its training images' epsilon as infinite; the
    frame carries it as JSON's Infinity (a NaN is still refused on sending)."""
    site = _site(tmp_path)
    site.privacy.required = False
    service = Running(site, tmp_path / "sock" / "site.sock")
    try:
        path = str(service.service.path)
        plain = forward(_message(MessageType.TRAIN, private=False), path, "train").content
        private = forward(_message(MessageType.TRAIN), path, "train").content
    finally:
        service.stop()
    assert plain[Rec.SITE][Site.REFUSED] == private[Rec.SITE][Site.REFUSED] == ""
    assert private[Rec.METRICS][Met.EPSILON] == float("inf")
    with socket.socket(socket.AF_UNIX) as unused, pytest.raises(ValueError, match="NaN"):
        send_frame(unused, {"metrics": {"x": [1.0, float("nan")]}})


def test_the_service_applies_the_sites_policy_whatever_the_forwarder_sends(running):
    reply = forward(_message(MessageType.TRAIN, private=False), str(running.service.path), "train").content

    assert "privacy.required" in reply[Rec.SITE][Site.REFUSED] and Rec.ARRAYS not in reply


def test_garbage_and_a_forwarder_that_hangs_up_do_not_stop_the_service(running):
    path = str(running.service.path)
    with socket.socket(socket.AF_UNIX) as s:  # not a frame at all
        s.connect(path)
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 3)
        s.shutdown(socket.SHUT_WR)
        assert b"unreadable request" in s.recv(4096)
    with socket.socket(socket.AF_UNIX) as s:  # a forwarder that dies inside its request
        s.connect(path)
        s.sendall(MAGIC + b"\x00\x00\x00\x10\x00\x00\x10\x00{")
    header, _ = ask(path, {"op": "status"})

    assert header["site"] == "hospital-a"
    assert forward(_message(MessageType.EVALUATE), path, "evaluate").content[Rec.METRICS][Met.EVAL_BINS] == 16


@pytest.mark.parametrize(
    ("header", "arrays"),
    [
        (b'{"op": "status", "x": 1' + b"0" * 5000 + b"}", b""),  # an integer longer than Python reads
        (b"[" * 100_000, b""),  # nested deeper than the JSON reader recurses
        (json.dumps({"op": "train", "config": {}, "keys": 5}).encode(), save({"w": np.zeros(2, np.float32)})),
    ],
    ids=["long-number", "deep-nesting", "keys-not-a-list"],
)
def test_a_frame_the_reader_chokes_on_is_answered_as_unreadable_and_the_service_serves_on(
    running, header, arrays
):
    """Frames an independent review sent from the ClientApp's side of the socket: each made the
    reader raise something other than a WireError, which ended `fedward site serve` for every study."""
    path = str(running.service.path)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(MAGIC + struct.pack("!II", len(header), len(arrays)) + header + arrays)
        s.settimeout(30)
        assert b"unreadable request" in s.recv(4096)

    assert ask(path, {"op": "status"})[0]["site"] == "hospital-a" and running.thread.is_alive()


def test_a_forwarder_that_dies_while_the_site_trains_leaves_the_round_charged_and_the_service_up(running):
    path, state = str(running.service.path), running.service.config.state_dir
    msg = _message(MessageType.TRAIN)
    with socket.socket(socket.AF_UNIX) as s:  # the whole request, then gone before the answer
        s.connect(path)
        config = {str(k): v for k, v in msg.content[Rec.CONFIG].items()}
        send_frame(
            s, {"op": "train", "config": config}, {k: a.numpy() for k, a in msg.content[Rec.ARRAYS].items()}
        )
    deadline = time.monotonic() + 120
    while "train" not in [e.kind for e in SiteAccountant(state).ledger.entries()]:
        assert time.monotonic() < deadline, "the service never trained the orphaned request"
        time.sleep(0.2)
    spent = SiteAccountant(state).epsilon(1e-5)  # the lost update's privacy is spent all the same

    again = forward(_message(MessageType.TRAIN), path, "train").content  # and the service goes on
    assert again[Rec.METRICS][Met.EPSILON] > spent > 0
    assert [e.kind for e in SiteAccountant(state).ledger.entries()] == ["count", "train", "train"]


def _status_within(path: str, seconds: float) -> dict:
    """The service's status answer, which must come within `seconds` (a held service fails the test
    instead of hanging it)."""
    answers: list[dict] = []
    thread = threading.Thread(target=lambda: answers.append(ask(path, {"op": "status"})[0]), daemon=True)
    thread.start()
    thread.join(seconds)
    assert answers, f"the service did not answer within {seconds:.0f}s: one forwarder holds it"
    return answers[0]


def test_a_forwarder_that_trickles_its_request_is_dropped_on_time(running, monkeypatch):
    """One byte now and then keeps no service busy: the whole request has READ_TIMEOUT_S."""
    monkeypatch.setattr(client.service, "READ_TIMEOUT_S", 1.5)
    path, stop = str(running.service.path), threading.Event()
    header = b'{"op": "status", "padding": "' + b"x" * 200 + b'"}'

    def trickle():
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(MAGIC + struct.pack("!II", len(header), 0))  # a well-formed start
            for byte in header:  # then its header, a byte every 0.3 s: a minute in all
                if stop.wait(0.3):
                    return
                try:
                    s.sendall(bytes([byte]))
                except OSError:  # dropped by the service
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    time.sleep(0.5)
    try:
        status = _status_within(path, 8)  # after 1.5 s of the trickler, not 60
        assert status == {"site": "hospital-a", "metrics": {}, "refused": ""}  # no count of other requests
    finally:
        stop.set()


def test_a_forwarder_that_never_reads_its_answer_does_not_hold_the_service(running, monkeypatch):
    """A trained model's answer is larger than the socket's buffer: unread, sending it would block
    for ever without a send timeout. The round is charged; its answer is lost, as if the forwarder had
    died (the test above)."""
    monkeypatch.setattr(client.service, "WRITE_TIMEOUT_S", 1.0)
    path, state = str(running.service.path), running.service.config.state_dir
    msg = _message(MessageType.TRAIN)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(path)
        config = {str(k): v for k, v in msg.content[Rec.CONFIG].items()}
        send_frame(silent, {"op": "train", "config": config},
                   {k: a.numpy() for k, a in msg.content[Rec.ARRAYS].items()})  # fmt: skip

        assert _status_within(path, 120)["site"] == "hospital-a"  # after the training, and 1 s more
        assert "train" in [e.kind for e in SiteAccountant(state).ledger.entries()]


def test_a_forwarder_without_a_service_says_where_it_looked(tmp_path):
    with pytest.raises(SiteUnreachableError, match=r"site\.sock.*fedward site serve"):
        forward(_message(MessageType.TRAIN), str(tmp_path / "site.sock"), "train")


def test_a_restarted_service_continues_its_ledger_and_a_second_one_is_refused(tmp_path):
    site, path = _site(tmp_path), tmp_path / "site.sock"
    first = Running(site, path)
    forward(_message(MessageType.TRAIN), str(path), "train")
    with pytest.raises(ServiceError, match="already listens"):
        SiteService(site, path=path).open()
    first.stop()
    spent = SiteAccountant(site.state_dir).epsilon(1e-5)

    second = Running(site, path)
    reply = forward(_message(MessageType.TRAIN), str(path), "train").content
    second.stop()

    assert reply[Rec.METRICS][Met.EPSILON] > spent
    assert reply[Rec.METRICS][Met.EPSILON] == pytest.approx(SiteAccountant(site.state_dir).epsilon(1e-5))


def test_serve_refuses_a_site_config_with_seeded_noise(tmp_path):
    site = _site(tmp_path)
    site.privacy.repeatable_noise = True
    with pytest.raises(ServiceError, match=r"privacy\.repeatable_noise.*simulations only"):
        serve(site, socket=str(tmp_path / "site.sock"))
    assert not (tmp_path / "site.sock").exists() and not (tmp_path / "state").exists()  # nothing started


def test_the_service_warns_when_other_users_can_read_the_sites_images(tmp_path, caplog):
    from common.config import load_site
    from tests.common.test_sources import write_dicom_site

    site = load_site(write_dicom_site(tmp_path / "site", patients=4, bad_files=False))
    images = tmp_path / "site" / site.data.root
    images.chmod(0o755)

    def warned() -> list[str]:
        caplog.clear()
        service = SiteService(site, path=tmp_path / f"sock-{len(list(tmp_path.iterdir()))}" / "site.sock")
        with caplog.at_level("WARNING"):
            service.open()
        service.close()
        return [r.getMessage() for r in caplog.records if "can be read by every user" in r.getMessage()]

    sheet = tmp_path / "site" / site.data.labels
    messages = warned()  # the image folder and the label sheet, each named with the fix
    assert len(messages) == 2 and all("chmod -R o-rwx" in m for m in messages)
    assert any(str(images) in m for m in messages) and any(str(sheet) in m for m in messages)
    images.chmod(0o750)
    sheet.chmod(0o640)
    assert warned() == []


def test_an_answer_that_cannot_be_sent_is_an_error_and_the_service_serves_on(tmp_path):
    """Weights of the coordinator's that make training diverge give a NaN loss, which no frame can
    carry (JSON): the forwarder gets an error naming the site, and the service goes on serving."""
    site = _site(tmp_path)
    site.privacy.required = False  # a site that allows non-private studies: its replies carry the loss
    service = Running(site, tmp_path / "sock" / "site.sock")
    try:
        poisoned = {k: v.fill_(float("inf")) for k, v in build_model("cnn28").state_dict().items()}
        content = RecordDict(
            {Rec.ARRAYS: ArrayRecord(poisoned), Rec.CONFIG: ConfigRecord(round_config(batch_size=16))}
        )
        with pytest.raises(RuntimeError, match="hospital-a.*could not be sent"):
            forward(
                Message(content, dst_node_id=1, message_type=MessageType.TRAIN),
                str(service.service.path),
                "train",
            )
        assert ask(str(service.service.path), {"op": "status"})[0]["site"] == "hospital-a"
    finally:
        service.stop()


def test_a_failure_at_the_site_sends_its_kind_not_its_message(running, monkeypatch, caplog):
    """An exception's message may name a file (and a patient's name with it); what goes back to the
    forwarder, and on to the coordinator, is its kind and where to look."""

    def failing(config, weights):
        raise OSError("cannot read /data/export/DOE^JANE/IM0001.dcm")

    monkeypatch.setattr(running.service.runtime, "evaluate", failing)
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError) as caught:
        forward(_message(MessageType.EVALUATE), str(running.service.path), "evaluate")

    assert "OSError" in str(caught.value) and "site's own log" in str(caught.value)
    assert "DOE^JANE" not in str(caught.value)
    assert any("DOE^JANE" in (r.exc_text or "") for r in caplog.records)  # the site's log has it all
