"""A deployment waits for several services at once (server.deploy.wait_ready): the first to fail is
named at once, with its log, not after the others are ready."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from server.deploy import DeploymentError, wait_ready
from server.processes import Service, stop_together


def service(tmp_path: Path, name: str, script: str) -> Service:
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, proc, log_path)


def serving(s: Service):
    return lambda: "serving on" in s.log_text()


def test_every_service_ready_returns(tmp_path):
    started = [service(tmp_path, f"site-{i}", f"sleep 0.{i}; echo serving on; sleep 300") for i in (1, 5)]
    try:
        wait_ready([(s, serving(s)) for s in started], 30, "serve")
        assert all(s.alive() and serving(s)() for s in started)
    finally:
        stop_together(started)


def test_one_that_exits_while_another_is_still_loading_is_named_at_once(tmp_path):
    slow = service(tmp_path, "site-slow", "sleep 60; echo serving on; sleep 300")
    broken = service(tmp_path, "site-broken", "echo 'data folder /x: no such folder'; exit 3")
    t0 = time.monotonic()
    try:
        with pytest.raises(DeploymentError) as err:
            wait_ready([(s, serving(s)) for s in (slow, broken)], 120, "serve")
    finally:
        stop_together([slow, broken])
    assert "site-broken exited (code 3) before it could serve" in str(err.value)
    assert "data folder /x: no such folder" in str(err.value)  # its log's end
    assert time.monotonic() - t0 < 60  # not after the slow one (60 s) or the timeout (120 s)


def test_one_not_ready_in_time_is_named(tmp_path):
    quiet = service(tmp_path, "site-quiet", "echo loading; sleep 300")
    try:
        with pytest.raises(DeploymentError, match=r"site-quiet did not serve within 1s(.|\n)*loading"):
            wait_ready([(quiet, serving(quiet))], 1, "serve")
    finally:
        stop_together([quiet])
