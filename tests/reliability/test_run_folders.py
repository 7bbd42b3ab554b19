"""A run folder protects what it holds: one run at a time, a finished or interrupted run is never
overwritten (--resume continues it, --force moves it aside), a damaged newest checkpoint falls back."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from server.run_claim import LOCK_FILE
from tests.conftest import run_fedward
from tests.reliability.runs import mounted_read_only, start, tiny_study, wait_for, wait_gone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-round run: (config, its folder)."""
    folder = tmp_path_factory.mktemp("finished")
    config, out = tiny_study(folder / "tiny.yaml", rounds=2), folder / "run"
    done = run_fedward("simulate", str(config), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return config, out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns(LOCK_FILE))
    return tmp_path / "run"


def test_a_finished_run_is_not_overwritten(finished, tmp_path):
    config, original = finished
    out = _copy(original, tmp_path)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_fedward("simulate", str(config), "--out", str(out))
    assert again.returncode == 2
    text = " ".join(again.stdout.split())
    assert "already holds a run (completed)" in text and "--resume" in text and "--force" in text
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_force_moves_the_old_run_aside_and_starts_afresh(finished, tmp_path):
    config, original = finished
    out = _copy(original, tmp_path)
    old_results = (out / "results.json").read_text()
    forced = run_fedward("simulate", str(config), "--out", str(out), "--rounds", "1", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "results.json").read_text() == old_results  # kept whole, not deleted
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    new = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in new["rounds"]] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001.pt"]  # no stale round 2


def test_a_study_into_a_simulate_folder_is_refused(finished, tmp_path):
    config, original = finished
    out = _copy(original, tmp_path)
    study = run_fedward("study", str(config), "--out", str(out))
    assert study.returncode == 2
    assert "already holds a `fedward simulate` run" in " ".join(study.stdout.split())
    assert not (out / "study.json").exists() and not (out / "report.html").exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path):
    config, original = finished
    out = _copy(original, tmp_path)
    newest = out / "checkpoints" / "round-0002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    resumed = run_fedward("simulate", str(config), "--out", str(out), "--rounds", "3", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"checkpoint {newest} cannot be read" in " ".join(resumed.stderr.split())
    after = json.loads((out / "results.json").read_text())
    assert after["status"] == "completed" and [r["round"] for r in after["rounds"]] == [1, 2, 3]
    assert "resuming after round 1" in (out / "fedward.log").read_text()


def test_two_runs_into_one_folder_the_second_is_refused_naming_the_first(tmp_path):
    config, out = tiny_study(tmp_path / "tiny.yaml", rounds=30), tmp_path / "run"
    first = start("simulate", str(config), "--out", str(out))
    try:
        wait_for(out / "results.json", first)
        second = run_fedward("simulate", str(config), "--out", str(out), "--resume")
        assert second.returncode == 2
        text = " ".join(second.stdout.split())
        assert f"is in use by process {first.pid}" in text and "fedward simulate" in text
        forced = run_fedward("simulate", str(config), "--out", str(out), "--force")  # not even with --force
        assert forced.returncode == 2 and f"process {first.pid}" in forced.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as kill -9: the kernel releases the lock with the process
        first.wait()
    assert wait_gone(first.pid) == []
    resumed = run_fedward("simulate", str(config), "--out", str(out), "--rounds", "2", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr  # no stale lock after kill -9


def test_an_out_that_is_a_file_or_read_only_is_a_clear_error(tmp_path):
    config = tiny_study(tmp_path / "tiny.yaml", rounds=1)
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    proc = run_fedward("simulate", str(config), "--out", str(a_file))
    # the console wraps long lines at 120 columns, and how a path wraps depends on its length
    assert proc.returncode == 2 and "is a file, not a folder" in " ".join(proc.stdout.split()), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    read_only = tmp_path / "ro"
    read_only.mkdir()
    with mounted_read_only(read_only):
        proc = run_fedward("simulate", str(config), "--out", str(read_only / "run"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "read-only or not writable" in " ".join(proc.stdout.split()), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
