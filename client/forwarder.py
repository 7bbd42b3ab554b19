"""What the ClientApp does at a deployed site: hand each Message to the site service and its answer back.

The ClientApp Flower starts (one process per message, from the app the coordinator ships) runs as an
OS user that can reach the site service's socket and nothing else of the site. It turns the Message
into plain values, sends them (client.wire), and turns the answer into the reply Message. It imports
neither torch nor any of the site's data code, so starting it is cheap. Whatever code stands in for
this module, the site service still decides what is trained and what leaves.
"""

from __future__ import annotations

import socket

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.wire import WireError, recv_frame, send_frame
from common.keys import Rec, Site

SOCKET_KEY = "site-socket"  # node config key: the site service's socket


class SiteUnreachableError(RuntimeError):
    """The site service does not answer: the message says where it was looked for and what to do."""


def forward(msg: Message, socket_path: str, op: str) -> Message:
    """Send `msg` (a train or evaluate request) to the site service at `socket_path`; its reply."""
    config = {str(k): v for k, v in msg.content[Rec.CONFIG].items()}
    arrays = {k: a.numpy() for k, a in msg.content[Rec.ARRAYS].items()}
    header, weights = ask(socket_path, {"op": op, "config": config}, arrays)
    if header.get("error"):
        raise RuntimeError(str(header["error"]))
    records: dict = {
        Rec.METRICS: MetricRecord(dict(header.get("metrics", {}))),
        Rec.SITE: ConfigRecord(
            {
                Site.NAME: str(header.get("site", "")),
                Site.REFUSED: str(header.get("refused", "")),
                Site.RELEASE: str(header.get("release", "")),
                Site.INPUT: str(header.get("input", "")),
            }
        ),
    }
    if weights:
        records[Rec.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
    return Message(RecordDict(records), reply_to=msg)


def ask(socket_path: str, header: dict, arrays: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """One request to the site service; raises SiteUnreachableError when nothing listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_path)
        except OSError as err:
            raise SiteUnreachableError(
                f"the site service at '{socket_path}' cannot be reached ({err.strerror or err}); the "
                "hospital runs it with `fedward site serve SITE_CONFIG`, and this SuperNode's ClientApp "
                "user needs access to that socket"
            ) from None
        send_frame(sock, header, arrays)
        try:
            return recv_frame(sock)
        except WireError as err:
            raise SiteUnreachableError(
                f"the site service at '{socket_path}' stopped answering ({err})"
            ) from None
    finally:
        sock.close()
