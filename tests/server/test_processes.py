"""A deployment's services stop with their whole process tree, several at once (server.processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from server.processes import Service, process_tree, stop_together

# A service that starts a helper in a session of its own (as Flower's processes do), and on SIGTERM
# notes the time, takes a second to shut down, notes the time again and exits.
SLOW_TO_STOP = """
import signal, subprocess, sys, time
from pathlib import Path
notes = Path(sys.argv[1])
helper = subprocess.Popen(["sleep", "300"], start_new_session=True)
def on_term(*_):
    notes.write_text(f"{time.time()}\\n")
    time.sleep(1.0)
    notes.write_text(notes.read_text() + f"{time.time()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""

DEAF_TO_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def start(tmp_path: Path, name: str, script: str) -> Service:
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"{name}.notes")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = Service(name, proc, log_path)
    deadline = time.monotonic() + 30
    while "ready" not in service.log_text():
        assert service.alive() and time.monotonic() < deadline, service.log_text()
        time.sleep(0.05)
    return service


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def test_services_stopped_together_shut_down_at_the_same_time_trees_and_all(tmp_path):
    services = [start(tmp_path, name, SLOW_TO_STOP) for name in ("a", "b")]
    trees = [process_tree(s.proc.pid) for s in services]
    assert all(len(tree) == 2 for tree in trees)  # the service and its helper

    stop_together(services)

    (a_term, a_exit), (b_term, b_exit) = (
        [float(t) for t in (tmp_path / f"{n}.notes").read_text().split()] for n in ("a", "b")
    )
    assert b_term < a_exit and a_term < b_exit  # each was told to stop before the other had exited
    assert all(s.proc.returncode == 0 for s in services)  # they shut down cleanly, not killed
    assert alive([pid for tree in trees for pid in tree]) == []  # the helpers too


def test_a_service_deaf_to_sigterm_is_killed_after_the_timeout(tmp_path):
    deaf = start(tmp_path, "deaf", DEAF_TO_SIGTERM)

    stop_together([deaf], timeout=1.0)

    assert deaf.proc.returncode == -9  # SIGKILL
    stop_together([deaf])  # a service that has exited already: nothing to do
