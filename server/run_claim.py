"""Claiming a run folder: one run writes to it at a time, and a run already in it is never overwritten.

    with claim_run_folder(out, resume=False, force=False, command="fedward simulate ..."):
        ...write results.json, checkpoints, the model...

A claim holds an exclusive `flock` on DIR/.fedward.lock for as long as the run writes: a second run
into the folder is refused, naming the process that holds it (the kernel drops the lock when that
process dies, `kill -9` included, so a crashed run never leaves a stale lock). A folder that already
holds a run (results.json, checkpoints, a study) is taken only to continue it (`resume`) or, with
`force`, after moving the old run aside to DIR.replaced-<time> (nothing is deleted). Every problem
raises RunFolderError (a ConfigError: the CLI prints it and exits 2) naming the folder and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from server.run_folder import (
    CHECKPOINTS_DIR,
    RESULTS_FILE,
    STUDY_FILE,
    VALIDATION_FILE,
    RunFolderError,
    io_error,
)

LOCK_FILE = ".fedward.lock"

log = logging.getLogger("fedward.run")


def holds_run(folder: Path) -> str | None:
    """What kind of run `folder` holds ("study", or results.json's status such as "completed",
    "interrupted"), or None when it holds none."""
    if (folder / STUDY_FILE).exists():
        return "study"
    if (folder / VALIDATION_FILE).exists():
        return "validation"
    results = folder / RESULTS_FILE
    if results.exists():
        try:
            return str(json.loads(results.read_text()).get("status", "unknown"))
        except (OSError, ValueError, AttributeError):
            return "damaged"
    checkpoints = folder / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return "interrupted"
    return None


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    pid, command, since = info.get("pid", "?"), info.get("command", "?"), info.get("since", "?")
    return f"process {pid} (`{command}`, since {since})"


def _lock(folder: Path, command: str) -> int:
    """An fd holding the folder's lock, with this process's pid and command written in the lock file."""
    lock_path = folder / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise io_error(folder, err, "write to the run folder") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(
            f"'{folder}' is in use by {_holder(lock_path)}; wait for that run to end, or choose another --out."
        ) from None
    stamp = {"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(stamp).encode(), 0)
    except OSError as err:
        os.close(fd)
        raise io_error(folder, err, "write to the run folder") from err
    return fd


def _move_aside(folder: Path) -> Path:
    aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.replace(folder, aside)
    return aside


def check_run_folder(folder: Path, *, resume: bool, force: bool, kind: str = "run") -> None:
    """Raise RunFolderError unless a `kind` run ("run", "study" or "validation") may write to `folder`
    as asked (only a "run" resumes).

    Checks only (no lock, nothing written): callers run it before starting anything."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out '{folder}' is a file, not a folder; choose a folder for the run.")
    held = holds_run(folder) if folder.is_dir() else None
    if held is None or force:
        return
    if resume and kind == "run" and held not in ("study", "validation"):
        return
    if held in ("study", "validation") or kind in ("study", "validation"):
        what = {"study": "a `fedward study`", "validation": "a `fedward validate`"}.get(
            held, f"a `fedward simulate` run ({held})"
        )
        raise RunFolderError(
            f"'{folder}' already holds {what}; choose a new --out folder, or add --force to move it "
            f"aside (to {folder.name}.replaced-<time>) and start afresh."
        )
    raise RunFolderError(
        f"'{folder}' already holds a run ({held}); continue it with --resume, choose a new --out folder, "
        f"or add --force to move it aside (to {folder.name}.replaced-<time>) and start afresh."
    )


@contextlib.contextmanager
def claim_run_folder(
    out: str | Path, *, resume: bool, force: bool, command: str, kind: str = "run"
) -> Iterator[Path]:
    """Hold `out` for one run (see the module docstring); yields the folder."""
    folder = Path(out)
    check_run_folder(folder, resume=resume, force=force, kind=kind)
    if force and folder.is_dir() and holds_run(folder) is not None:
        fd = _lock(folder, command)  # refuse to move a folder another run is writing to
        try:
            aside = _move_aside(folder)
        finally:
            os.close(fd)
        log.warning("--force: moved the run that was in %s aside to %s", folder, aside)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise io_error(folder, err, "make the run folder") from err
    fd = _lock(folder, command)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
