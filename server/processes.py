"""The processes a local deployment starts: a free port, a process and its descendants, a Service.

`Service` is one started process with its log file; it stops the whole tree of processes it started
(Flower starts its helpers in new sessions, so a process group would miss them), also by SIGKILL, as
a crash would; `stop_together` stops several services at once (a deployment's SuperNodes, say),
so that their shutdowns overlap. Linux only: the tree is read from /proc. Used by server.deploy and its tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    """{parent pid: child pids} of every process, from /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def process_tree(*pids: int) -> list[int]:
    """The `pids` and all their descendants (Flower starts its helpers in new sessions, not our
    group), from one reading of /proc."""
    tree, out, todo = _children(), [], list(pids)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += tree.get(p, [])
    return out


@dataclass
class Service:
    """One process this deployment started, with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    log_start: int = 0  # where this process's part of the (appended) log file begins

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the process and everything it started (a site or coordinator that just dies)."""
        if self.proc.poll() is None:
            self._signal_tree(signal.SIGKILL)
        self._reap(5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process tree, then SIGKILL whatever is left after `timeout` seconds."""
        stop_together([self], timeout)

    def _signal_tree(self, sig: int) -> None:
        for p in process_tree(self.proc.pid):
            _send(p, sig)

    def _reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def stop_together(services: list[Service], timeout: float = 10.0) -> None:
    """Stop several services at once: SIGTERM every process tree, wait until all have exited (each
    shuts down at the same time as the others, not one after another), then SIGKILL whatever is left
    after `timeout` seconds."""
    # one that has exited is skipped: its pid may be reused now; its helpers watch it and exit
    running = [s for s in services if s.proc.poll() is None]
    pids = process_tree(*(s.proc.pid for s in running)) if running else []
    for p in pids:
        _send(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        for s in running:
            s.proc.poll()
        time.sleep(0.1)
    for p in pids:
        if _exists(p):  # a pid that has exited may belong to another process by now
            _send(p, signal.SIGKILL)
    for s in running:
        s._reap(5.0)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
