"""Writing a file so that readers never see half of it and a crash never leaves it damaged; JSON
written that way (NaN and infinities as null); a file name from an id that came from elsewhere."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    On any error (a full disk, a read-only folder) the temporary file is removed, the OSError is
    raised and the file that was at `path` before is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk too (best effort)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers, keys strings."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON at `path`, atomically (write_atomic)."""
    write_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False))


MAX_NAME_FROM_ID = 120  # UTF-8 bytes: file systems allow 255 a name, and suffixes follow


def name_from_id(text: str) -> str:
    """`text` (a study id the coordinator sent) as a file name: letters, digits, '-', '_' and '.' kept,
    anything else (a '/', for one) as '_', so that it names a file in its folder and nowhere else. A
    longer name is cut and ends in a hash of the whole id (BLAKE2b), so it still names one file."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_NAME_FROM_ID:
        return name
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{encoded[: MAX_NAME_FROM_ID - len(digest) - 1].decode('utf-8', 'ignore')}-{digest}"
