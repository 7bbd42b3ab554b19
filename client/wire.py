"""The local link between the ClientApp Flower starts and the hospital's own site service.

One request per connection over a Unix socket: a frame is a 4-byte magic, the lengths of a JSON header
and of a safetensors blob (model arrays, possibly none), then both. Plain values only: the header holds
numbers (never NaN; an infinite epsilon as JSON's `Infinity`), strings, booleans and lists of numbers;
arrays are safetensors, which loading never turns into code. The forwarder (client.forwarder) uses
numpy, the service (client.service) torch.

    request header: {"op": "train" | "evaluate" | "status", "config": {...the round's ConfigRecord...}}
    reply header:   {"site": "...", "metrics": {...}, "refused": "", "error": ""}
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

MAGIC = b"FWS1"
_LENGTHS = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 20  # a round's config and a reply's metrics are far smaller
MAX_ARRAY_BYTES = 4 << 30  # a model's weights; larger frames are refused unread
OPS = ("train", "evaluate", "status")


class WireError(RuntimeError):
    """A frame that is not fedward's, too large, cut short, or holding something other than plain values."""


def send_frame(sock: socket.socket, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Send one frame: `header` as JSON and `arrays` (kept in their order) as safetensors."""
    if arrays:
        header = {**header, "keys": list(arrays)}
    _refuse_nan(header)
    head = json.dumps(header).encode("utf-8")  # an infinity as JSON's Infinity (an unbounded epsilon)
    blob = save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    sock.sendall(MAGIC + _LENGTHS.pack(len(head), len(blob)) + head + blob)


def _refuse_nan(value: object) -> None:
    """ValueError if `value` holds a NaN: numbers sent are finite, or infinite (an epsilon no DP bounds)."""
    if isinstance(value, float) and math.isnan(value):
        raise ValueError("a frame's header holds a NaN")
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    for item in items:
        _refuse_nan(item)


def recv_frame(sock: socket.socket, *, within_s: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read one frame: (header, arrays in the order the sender gave them). With `within_s`, the whole
    frame must come within that many seconds (TimeoutError otherwise), however it is trickled."""
    deadline = None if within_s is None else time.monotonic() + within_s
    prefix = _recv_exactly(sock, deadline, len(MAGIC) + _LENGTHS.size)
    if prefix[: len(MAGIC)] != MAGIC:
        raise WireError(f"not a fedward frame (starts with {prefix[:8]!r})")
    n_head, n_blob = _LENGTHS.unpack(prefix[len(MAGIC) :])
    if n_head > MAX_HEADER_BYTES or n_blob > MAX_ARRAY_BYTES:
        raise WireError(f"frame too large (header {n_head} bytes, arrays {n_blob} bytes)")
    raw_header = _recv_exactly(sock, deadline, n_head)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # not UTF-8 or JSON, a number too long, nesting too deep
        raise WireError(f"the frame's header is not JSON the site can read ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("the frame's header is not a JSON object")
    arrays: dict[str, np.ndarray] = {}
    if n_blob:
        try:
            loaded = load_arrays(_recv_exactly(sock, deadline, n_blob))
        except Exception as err:  # safetensors raises its own error types for a damaged blob
            raise WireError(f"the frame's arrays are not safetensors ({err})") from None
        keys = header.pop("keys", list(loaded))
        if (
            not isinstance(keys, list)
            or not all(isinstance(k, str) for k in keys)
            or sorted(keys) != sorted(loaded)
        ):
            raise WireError("the frame's key list does not match its arrays")
        arrays = {k: loaded[k] for k in keys}
    return header, arrays


def plain_config(config: object) -> dict[str, int | float | str | bool | list]:
    """A round's config as a dict of scalars and lists of scalars (a ConfigRecord's values), or WireError
    naming the first value that is neither."""
    if not isinstance(config, dict):
        raise WireError("'config' must be a JSON object")
    for key, value in config.items():
        items = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(isinstance(v, int | float | str | bool) for v in items):
            raise WireError(
                f"config key {key!r} holds {type(value).__name__}, not a number, text or flag (or a list of them)"
            )
    return config


def _recv_exactly(sock: socket.socket, deadline: float | None, n: int) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError(f"{n - left} of {n} bytes came before the deadline")
            sock.settimeout(left_s)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WireError(f"the connection closed {n - left} bytes into a {n}-byte read")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
