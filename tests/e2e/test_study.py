"""`fedward study` end to end on the synthetic demo data: every part, leave-one-out isolation,
uncertainty, the report in a real browser (headless Chromium), and `fedward report` rebuilds.

One small study (3 sites, 2 rounds, with and without privacy: 5 federations through Flower's engine
plus 7 trainings in process) runs once for the module; each test checks one side of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_fedward
from tests.server.test_report import assert_not_blank

SITES = ["hospital-a", "hospital-b", "hospital-c"]
PLOTS = ["auc_by_round.png", "epsilon_by_round.png", "roc_curves.png", "cross_site.png", "comparison.png"]
STUDY = """
name: study-test
seed: 0
rounds: 2
min_sites: 2
data:
  num_sites: 3
  synthetic: {train_per_site: 100, test_per_site: 60}
train: {local_epochs: 1, batch_size: 25, lr: 0.002}
privacy: {enabled: false, target_epsilon: 8.0, delta: 1.0e-5}
simulation: {client_cpus: 1}
study: {compare_privacy: true, bootstrap_samples: 200}
"""


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> tuple[Path, dict, str]:
    tmp = tmp_path_factory.mktemp("study")
    config = tmp / "study.yaml"
    config.write_text(STUDY)
    out = tmp / "out"
    proc = run_fedward("study", str(config), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "study.json").read_text()), proc.stdout


@pytest.mark.slow
def test_study_json_holds_every_part_on_the_same_sites(study_run):
    out, doc, _ = study_run
    assert doc["status"] == "completed" and doc["sites"] == SITES
    assert doc["variants"] == ["federated", "federated-dp"] and doc["primary"] == "federated"
    expected = {"federated", "federated-dp", "centralized"}
    expected |= {f"{kind}:{s}" for kind in ("local", "local-dp", "leave-one-out") for s in SITES}
    assert set(doc["models"]) == expected

    for key in ("federated", "federated-dp", "centralized", *(f"local:{s}" for s in SITES)):
        assert set(doc["models"][key]["eval"]) == {*SITES, "pooled"}  # every site's test data
    for s in SITES:  # local-only: the same epochs as the federation (rounds x local_epochs)
        assert doc["models"][f"local:{s}"]["epochs"] == 2
        assert doc["models"][f"local:{s}"]["n_train"] == doc["site_info"][s]["n_train"] == 100
    assert doc["models"]["centralized"]["n_train"] == 300

    # the federated model tested here in process == what the sites reported through Flower
    for variant in ("federated", "federated-dp"):
        reported = json.loads((out / variant / "results.json").read_text())["final"]["sites"]
        for s in SITES:
            assert doc["models"][variant]["eval"][s]["auc"] == pytest.approx(reported[s]["auc"], abs=1e-6)
        assert doc["models"][variant]["participants"] == SITES

    comp = doc["comparison"]
    assert comp["columns"] == [
        "local",
        "local-dp",
        "federated",
        "federated-dp",
        "centralized",
        "leave-one-out",
    ]
    for s in [*SITES, "pooled"]:
        assert set(comp["rows"][s]) == set(comp["columns"])
        assert {"federated_vs_local", "federated-dp_vs_local-dp"} <= set(comp["gains"][s])
    cs = doc["cross_site"]
    assert cs["columns"] == [*SITES, "pooled"] and len(cs["rows"]) == 2 * len(SITES) + 3
    assert all(len(row) == len(SITES) + 1 and all(v is not None for v in row) for row in cs["auc"])
    assert any(s in line for line in doc["summary"] for s in SITES) and len(doc["summary"]) >= 4
    # the pooled AUC split by its pairs: within a site and across two, which make up the pooled AUC
    for column in ("federated", "centralized", "local"):
        cell = comp["rows"]["pooled"][column]
        parts = cell["auc_parts"]
        share = parts["across_share"]
        assert 0 < share < 1
        assert cell["auc"] == pytest.approx(
            parts["within_sites"] * (1 - share) + parts["across_sites"] * share, abs=1e-3
        )
    assert any(line.startswith("Of the pooled AUC's (positive, negative) pairs") for line in doc["summary"])


@pytest.mark.slow
def test_local_training_under_privacy_spends_the_same_budget_as_the_federation(study_run):
    _, doc, _ = study_run
    for s in SITES:
        local = doc["models"][f"local-dp:{s}"]
        federated = doc["models"]["federated-dp"]["epsilon"][s]
        # noise derived for target 8 to within derive_noise_multiplier's epsilon_tolerance of 0.01; the
        # federated site's count includes its released training-set size, the local one's does not
        for spent in (local["epsilon"], federated):
            assert 8.0 - 0.01 <= spent <= 8.0 + 1e-6
        assert np.all(np.diff(local["epsilon_by_round"]) > 0)
        assert doc["models"][f"local:{s}"]["epsilon"] is None


@pytest.mark.slow
def test_leave_one_out_never_sends_anything_to_the_left_out_site(study_run):
    out, doc, _ = study_run
    for s in SITES:
        others = [x for x in SITES if x != s]
        model = doc["models"][f"leave-one-out:{s}"]
        assert model["held_out"] == s and model["nodes"] == others and model["participants"] == others
        assert set(model["eval"]) == {s}  # tested on the left-out site only
        results = json.loads((out / "leave-one-out" / s / "results.json").read_text())
        assert results["status"] == "completed" and len(results["rounds"]) == 2
        assert set(results["initial"]["sites"]) == set(others)  # the initial model went to the others only
        for r in results["rounds"]:
            assert s not in r["participants"] and s not in r["train"] and s not in r["sites"]
            assert set(r["participants"]) == set(others)
        assert s not in (out / "leave-one-out" / s / "fedward.log").read_text()  # no reply from it at all
        assert doc["comparison"]["rows"][s]["leave-one-out"]["auc"] == model["eval"][s]["auc"]


@pytest.mark.slow
def test_every_site_has_intervals_and_calibration(study_run):
    _, doc, _ = study_run
    assert doc["settings"]["bootstrap_samples"] == 200 and doc["settings"]["confidence"] == 0.95
    for key in ("federated", "federated-dp", "centralized"):
        for s in [*SITES, "pooled"]:
            block = doc["models"][key]["eval"][s]
            for metric in ("auc", "sensitivity", "specificity"):
                lo, hi = block["ci"][metric]
                assert 0.0 <= lo <= block[metric] <= hi <= 1.0, (key, s, metric)
            assert 0.0 <= block["ece"] <= 1.0
            assert sum(b["n"] for b in block["calibration"]) == block["n_test"]
            assert block["roc"]["fpr"][-1] == 1.0 and block["roc"]["tpr"][-1] == 1.0


@pytest.mark.slow
def test_report_has_every_plot_and_the_per_site_table(study_run):
    out, _, _ = study_run
    for name in PLOTS:
        assert_not_blank(out / name)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)  # embedded: one self-contained file
    assert "<script" not in page and "http://" not in page and "https://" not in page
    table = page.split('id="per-site-table"')[1].split("</table>")[0]
    assert all(s in table for s in [*SITES, "pooled"]) and "centralized" in table and "federated, DP" in table


@pytest.mark.slow
def test_report_renders_in_headless_chromium(study_run, tmp_path):
    out, _, _ = study_run
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is needed: apt-get update && apt-get install -y chromium")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    # a copy of the report with a probe that writes each image's decoded size into the page
    probe = """<script>window.addEventListener("load", () => {
      const out = document.createElement("pre"); out.id = "image-check";
      out.textContent = JSON.stringify([...document.images].map(
          i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})));
      document.body.appendChild(out); });</script>"""
    page = tmp_path / "report.html"
    page.write_text((out / "report.html").read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = json.loads(dom.stdout.split('<pre id="image-check">')[1].split("</pre>")[0])
    assert len(images) == len(PLOTS)
    assert all(i["complete"] and i["width"] > 300 and i["height"] > 200 for i in images), images
    table = dom.stdout.split('id="per-site-table"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + len(SITES) + 1  # header, sites, pooled

    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [chromium, *flags, "--window-size=1280,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert_not_blank(shot)


@pytest.mark.slow
def test_fedward_report_rebuilds_from_the_json_of_study_and_simulate_runs(study_run, tmp_path):
    out, _, _ = study_run
    copy = tmp_path / "study"
    copy.mkdir()
    shutil.copy(out / "study.json", copy / "study.json")  # the JSON alone: no models, no data
    proc = run_fedward("report", str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in copy.glob("*.png")) == sorted(PLOTS)
    original = (out / "report.html").read_text()
    assert (copy / "report.html").read_text().split("<h2>Plots")[0] == original.split("<h2>Plots")[0]

    plain = tmp_path / "simulate"
    plain.mkdir()
    shutil.copy(out / "federated-dp" / "results.json", plain / "results.json")
    proc = run_fedward("report", str(plain))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in plain.glob("*.png")) == ["auc_by_round.png", "epsilon_by_round.png"]
    assert 'id="per-site-table"' in (plain / "report.html").read_text()


@pytest.mark.slow
def test_progress_shows_part_round_site_and_time_left(study_run):
    out, doc, stdout = study_run
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    n = len(doc["parts"])
    assert lines[0].startswith(f"[1/{n} ") and "federated" in lines[0]
    assert any(f"[{n}/{n} " in line and "leave out hospital-c" in line for line in lines)
    assert any("round 2/2" in line and "federated with privacy" in line for line in lines)
    assert any("hospital-b: trained alone" in line for line in lines)
    assert sum("left]" in line for line in lines) == len(lines)
    assert any("about" in line for line in lines[1:])  # an estimate once something is measured
    state = json.loads((out / "progress.json").read_text())
    assert state["part"] == "leave-one-out:hospital-c" and state["done_fraction"] == 1.0
