"""Every bad input is caught before training, with a message naming the file, key or option and what
to do, and nothing already written is lost: labels past the classes, option values, empty configs,
delta, a full disk, a torn ledger line, a budget passed by added rounds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import run_fedward
from tests.reliability.runs import small_disk, start, tiny_study, wait_gone


def _no_traceback(proc) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    return " ".join(text.split())


@pytest.fixture
def npz_with_labels_7_and_9(tmp_path, medmnist_dir):
    """pneumoniamnist.npz (two classes) with some training labels 7 and 9."""
    data = dict(np.load(medmnist_dir / "pneumoniamnist.npz"))
    labels = data["train_labels"].copy()
    labels[:5], labels[5:9] = 7, 9
    data["train_labels"] = labels
    folder = tmp_path / "bad-data"
    folder.mkdir()
    np.savez(folder / "pneumoniamnist.npz", **data)
    return folder


def test_npz_labels_past_the_classes_are_refused_before_training_and_by_site_check(
    npz_with_labels_7_and_9, tmp_path
):
    out = tmp_path / "out"
    proc = run_fedward(
        "simulate",
        "configs/pneumoniamnist.yaml",
        "--data-dir",
        str(npz_with_labels_7_and_9),
        "--out",
        str(out),
    )
    text = _no_traceback(proc)
    assert proc.returncode == 2 and "labels [7, 9] run past the 2 classes" in text, text
    assert "pneumoniamnist.npz" in text and not out.exists()

    site = tmp_path / "site.yaml"
    site.write_text(
        f"site: hospital-m\ndata:\n  format: medmnist\n  path: {npz_with_labels_7_and_9 / 'pneumoniamnist.npz'}\n"
    )
    check = run_fedward("site", "check", str(site))
    text = _no_traceback(check)
    assert check.returncode != 0 and "labels [7, 9] run past the 2 classes" in text, text


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--rounds", "0"], "--rounds is 0"), (["--sites", "0"], "--sites is 0")],
)
def test_option_values_of_zero_are_refused(tmp_path, args, message):
    proc = run_fedward("simulate", "configs/demo.yaml", "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2 and message in _no_traceback(proc)
    assert not (tmp_path / "out").exists()


def test_an_empty_config_and_a_delta_of_one_are_refused_naming_the_file_and_key(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing here\n")
    proc = run_fedward("simulate", str(empty), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"{empty}: the study config is empty" in _no_traceback(proc)
    delta = tiny_study(tmp_path / "delta.yaml", extra="privacy: {enabled: true, delta: 1.0}\n")
    proc = run_fedward("simulate", str(delta), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "'privacy.delta' is 1.0" in _no_traceback(proc)
    assert not (tmp_path / "out").exists()  # refused before anything started


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_what_was_written_stays_intact(tmp_path):
    disk = tmp_path / "disk"
    config = tiny_study(tmp_path / "tiny.yaml", rounds=6)
    with small_disk(disk, "1m"):  # room for round 1's checkpoint (~0.6 MB), not round 2's
        proc = start("simulate", str(config), "--out", str(disk / "run"))
        output, _ = proc.communicate(timeout=300)
        text = " ".join(output.split())
        assert proc.returncode == 2, output
        assert "Traceback" not in output and "the disk is full" in text and str(disk / "run") in text, output
        results = json.loads((disk / "run" / "results.json").read_text())  # intact, and says how far it got
        checkpoints = sorted((disk / "run" / "checkpoints").glob("round-*.pt"))
        assert checkpoints and results["rounds"]
        assert torch.load(checkpoints[-1], weights_only=False)["round"] == results["rounds"][-1]["round"]
        assert not list((disk / "run").rglob("*.tmp"))  # no half-written files left behind
        assert wait_gone(proc.pid) == []


@pytest.mark.slow
def test_added_rounds_past_the_target_and_a_torn_ledger_line_are_reported(tmp_path):
    config = tiny_study(
        tmp_path / "dp.yaml", rounds=2, extra="privacy: {enabled: true, target_epsilon: 3.0}\n"
    )
    out = tmp_path / "run"
    first = run_fedward("simulate", str(config), "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warnings" not in json.loads((out / "results.json").read_text())  # at the target, not past it
    ledger = out / "sites" / "hospital-a" / "privacy-ledger.jsonl"
    with ledger.open("a") as f:  # the process died inside an append: half a line, no newline
        f.write('{"round": 3, "attempt": 1, "steps": 4, "sample_')

    more = run_fedward("simulate", str(config), "--out", str(out), "--rounds", "3", "--resume")
    assert more.returncode == 0, more.stdout + more.stderr
    text = _no_traceback(more)
    assert f"{ledger}:" in text and "torn last line ignored" in text
    results = json.loads((out / "results.json").read_text())
    budget = [w for w in results["warnings"] if w["kind"] == "budget"]
    assert {w["site"] for w in budget} == {"hospital-a", "hospital-b"}
    assert all(w["round"] == 3 and w["epsilon"] > 3.0 for w in budget)
    assert "past the study's target_epsilon 3" in text
    assert os.path.getsize(ledger) and ledger.read_text().endswith("\n")  # the torn line was cut off
