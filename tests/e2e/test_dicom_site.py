"""Two hospitals' DICOM exports, end to end: `site check` lists the corrupt files and passes, then
`fedward simulate` trains a 2-site study on them (`data.source: sites`) for 2 rounds.

    pytest tests/e2e/test_dicom_site.py -q
"""

from __future__ import annotations

import json
import re

import pytest

from client.ledger import SiteAccountant
from common.config import load_site
from common.sources import scan_site
from tests.common.test_sources import BAD, write_dicom_site
from tests.conftest import run_fedward


@pytest.mark.slow
def test_two_dicom_sites_pass_the_check_and_train_for_two_rounds(tmp_path):
    allow = {"required": False}  # this study trains without privacy, which each site must allow
    a = write_dicom_site(tmp_path / "a", name="hospital-a", patients=12, size=32, seed=1, privacy=allow)
    # 12 patients: each patient's split is its own draw (common.labels.patient_split), and hospital-b's
    # first 10 ids draw no test patient at split seed 0 (8 / 2 / 0; 12 give 9 / 2 / 1)
    b = write_dicom_site(
        tmp_path / "b", name="hospital-b", patients=12, size=32, seed=2, bad_files=False, privacy=allow
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: dicom-sites\nseed: 0\nrounds: 2\nmin_sites: 2\n"
        "classes: [normal, pneumonia]\n"
        f"data: {{source: sites, site_configs: [{a.relative_to(tmp_path)}, {b.relative_to(tmp_path)}]}}\n"
        "model: {name: cnn28}\ntrain: {local_epochs: 1, batch_size: 16}\n"
    )

    check = run_fedward("site", "check", str(a), timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in BAD:
        assert name in check.stdout
    assert "NOT usable" not in check.stdout
    verdict = re.fullmatch(r"usable: (\d+) images; (\d+) skipped", check.stdout.strip().splitlines()[-1])
    assert verdict, check.stdout  # the last line is the verdict ...
    report = scan_site(load_site(a))
    assert (int(verdict[1]), int(verdict[2])) == (
        len(report.samples),
        len(report.bad),
    )  # ... with its numbers
    assert len(report.bad) >= len(BAD)

    out = tmp_path / "run"
    proc = run_fedward("simulate", str(study), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bad/truncated.dcm" in proc.stderr  # the skipped files are in the site's log

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["rounds"][-1]["participants"] == ["hospital-a", "hospital-b"]
    for name, path in (("hospital-a", a), ("hospital-b", b)):
        report = scan_site(load_site(path))
        assert report.decoded == 0  # the check and the simulation filled the cache
        final = results["final"]["sites"][name]
        # a hospital's default: its test labels protected, per patient (up to 4 images each): noise std
        # 2 x 4 on each of 2 x 16 counts, so the noised total's std is 8 x sqrt(32) = 45
        assert final["release"] == "dp_histogram" and final["privacy_unit"] == "patient"
        assert abs(final["n_test"] - report.count("test")) < 4 * 8 * 32**0.5
        assert results["rounds"][-1]["train"][name]["n_train"] == report.count("train")


@pytest.mark.slow
def test_a_private_study_on_dicom_sites_protects_patients_within_the_target(tmp_path):
    """Each patient has two images: with patient ids in the label sheet, the unit of privacy is the
    patient, at the sites' own default policy (privacy required)."""
    a = write_dicom_site(tmp_path / "a", name="hospital-a", patients=14, size=28, seed=1, bad_files=False)
    b = write_dicom_site(tmp_path / "b", name="hospital-b", patients=12, size=28, seed=2, bad_files=False)
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: dicom-dp\nseed: 0\nrounds: 2\nmin_sites: 2\n"
        "classes: [normal, pneumonia]\n"
        f"data: {{source: sites, site_configs: [{a.relative_to(tmp_path)}, {b.relative_to(tmp_path)}]}}\n"
        "model: {name: cnn28-small}\ntrain: {local_epochs: 1, batch_size: 4}\n"
        "privacy: {enabled: true, target_epsilon: 8.0}\n"
    )

    proc = run_fedward("simulate", str(study), "--out", str(tmp_path / "run"), timeout=300)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["rounds"][-1]["participants"] == ["hospital-a", "hospital-b"]
    for name, path in (("hospital-a", a), ("hospital-b", b)):
        final = results["final"]["sites"][name]
        assert final["privacy_unit"] == "patient" and 0 < final["epsilon"] <= 8.0 + 1e-6
        (count,) = [
            e for e in SiteAccountant(load_site(path).state_dir).ledger.entries() if e.kind == "count"
        ]
        patients = len(scan_site(load_site(path)).patients("train"))
        assert abs(count.value - patients) < 60  # it released its (noised) number of patients
