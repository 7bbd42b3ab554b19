"""Real `fedward` processes for the reliability tests: start one, wait for a file, signal it, look for
what it left behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

TINY_STUDY = """\
name: tiny
rounds: {rounds}
min_sites: 2
data:
  source: synthetic
  num_sites: 2
  synthetic: {{train_per_site: 60, test_per_site: 30, image_size: 28}}
model: {{name: cnn28}}
train: {{local_epochs: 1, batch_size: 16}}
"""


def tiny_study(path: Path, rounds: int = 3, extra: str = "") -> Path:
    """A two-site synthetic study whose rounds take about a second each."""
    path.write_text(TINY_STUDY.format(rounds=rounds) + extra)
    return path


def start(*args: str, preexec_fn=None) -> subprocess.Popen:
    """`fedward ARGS` in a session of its own (so its whole process tree can be signalled and found)."""
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists; fails if the process ended first or the time ran out."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (code {proc.returncode}) before {path} appeared:\n{proc.stdout.read()}"
            )
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.05)


def session_processes(sid: int) -> list[str]:
    """The command lines of every process still alive in session `sid` (Ray's, Flower's, ours)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (OSError, ProcessLookupError):
            continue
    return alive


def wait_gone(sid: int, timeout: float = 30) -> list[str]:
    """What is still alive in session `sid` after up to `timeout` s (Ray's processes end shortly after)."""
    deadline = time.time() + timeout
    while (left := session_processes(sid)) and time.time() < deadline:
        time.sleep(0.2)
    return left


@contextlib.contextmanager
def mounted_read_only(folder: Path):
    """`folder` as a real read-only file system (a tmpfs mounted ro: root), or, for a user who cannot
    mount, a folder without write permission (which such a user cannot bypass)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    _mount(folder, "ro,size=1m")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """`folder` as a tmpfs of `size` (e.g. "1m"): a real file system that fills up."""
    _mount(folder, f"size={size}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _mount(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise AssertionError(
            f"cannot mount a tmpfs at {folder} ({done.stderr.strip()}): the reliability tests need root "
            "(as CI has) to make small and read-only file systems"
        )
