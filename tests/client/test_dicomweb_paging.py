"""The DICOMweb poller's listing of a PACS's instances ends, page by page, also against a PACS that
ignores QIDO-RS's offset and answers every page with the same instances (it would page forever). The
PACS here answers from a list, as its QIDO-RS would; the whole round trip with a real Orthanc is
tests/e2e/test_pacs.py."""

from __future__ import annotations

import client.dicomweb_poller as poller_module
from client.dicomweb_poller import SOP, DicomWebPoller


class ListingPacs:
    """QIDO-RS search_for_instances over `uids`; `ignores_offset`: every page starts at the first."""

    def __init__(self, uids: list[str], *, ignores_offset: bool = False):
        self.uids, self.ignores_offset, self.requests = uids, ignores_offset, 0

    def search_for_instances(self, *, fields, limit, offset):
        self.requests += 1
        start = 0 if self.ignores_offset else offset
        return [{SOP: {"vr": "UI", "Value": [uid]}} for uid in self.uids[start : start + limit]]


def _poller(pacs: ListingPacs) -> DicomWebPoller:
    poller = DicomWebPoller.__new__(DicomWebPoller)  # the listing needs only its PACS
    poller.client, poller.url = pacs, "http://pacs.test/dicom-web"
    return poller


def test_every_instance_is_listed_across_pages(monkeypatch):
    monkeypatch.setattr(poller_module, "PAGE", 3)
    pacs = ListingPacs([f"1.2.{i}" for i in range(7)])
    assert [item[SOP]["Value"][0] for item in _poller(pacs).instances()] == pacs.uids
    assert pacs.requests == 3  # 3 + 3 + 1


def test_a_pacs_that_ignores_the_offset_is_listed_once(monkeypatch, caplog):
    monkeypatch.setattr(poller_module, "PAGE", 3)
    pacs = ListingPacs([f"1.2.{i}" for i in range(7)], ignores_offset=True)
    assert [item[SOP]["Value"][0] for item in _poller(pacs).instances()] == pacs.uids[:3]
    assert pacs.requests == 2  # the repeated page ends it
    assert "ignores QIDO-RS's offset" in caplog.text
