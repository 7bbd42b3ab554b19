"""Ctrl-C and SIGTERM end a run cleanly: status interrupted, the round reached, the command to resume,
no site blamed, a conventional exit status, no Ray or Flower process left; --resume then finishes."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import run_fedward
from tests.reliability.runs import start, tiny_study, wait_for, wait_gone

pytestmark = pytest.mark.slow


def test_ctrl_c_records_where_the_run_stopped_and_resume_finishes_it(tmp_path):
    config, out = tiny_study(tmp_path / "tiny.yaml", rounds=6), tmp_path / "run"
    args = ["simulate", str(config), "--out", str(out)]
    proc = start(*args)
    wait_for(out / "checkpoints" / "round-0001.pt", proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the group, Ray's too
    output, _ = proc.communicate(timeout=180)

    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    info = results["interrupted"]
    assert info["signal"] == "SIGINT" and 1 <= info["round_reached"] < 6
    assert info["resume"].endswith(f"--out {out} --resume")
    assert [r["round"] for r in results["rounds"]] == list(range(1, info["round_reached"] + 1))
    assert all(not r["failed"] and not r["refused"] for r in results["rounds"])  # no hospital blamed
    assert "stop_reason" not in results
    assert f"continue with: {info['resume']}" in " ".join(output.split())
    assert wait_gone(proc.pid) == []  # no Ray or Flower process stays behind

    resumed = run_fedward(*info["resume"].split()[1:])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = json.loads((out / "results.json").read_text())
    assert after["status"] == "completed" and [r["round"] for r in after["rounds"]] == [1, 2, 3, 4, 5, 6]


def test_sigterm_ends_the_run_with_status_143(tmp_path):
    config, out = tiny_study(tmp_path / "tiny.yaml", rounds=6), tmp_path / "run"
    proc = start("simulate", str(config), "--out", str(out))
    wait_for(out / "checkpoints" / "round-0001.pt", proc)
    proc.send_signal(signal.SIGTERM)  # a service manager's stop: to the main process only
    output, _ = proc.communicate(timeout=180)

    assert proc.returncode == 143, output
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["interrupted"]["signal"] == "SIGTERM"
    assert wait_gone(proc.pid) == []
    refused = run_fedward("simulate", str(config), "--out", str(out))  # no --resume: nothing is overwritten
    assert refused.returncode == 2 and "--resume" in refused.stdout, refused.stdout
