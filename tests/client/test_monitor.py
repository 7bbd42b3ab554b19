"""`fedward site monitor`: a site that trained on a DICOM export keeps what it trained on; a new export
from the same scanner shows no drift, one from a changed scanner (gain, blur, pixel spacing, vendor) or
with another prevalence is flagged on the right features, and the exit status says which."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from client.monitor import MonitorError, monitor, psi
from client.site import SiteRuntime
from common.config import load_site
from common.models import build_model
from common.package import write_package
from common.scanners import Scanner, acquire
from common.schema import SiteConfig
from common.synthetic import synthetic_images_with_findings
from server.cli import main as fedward
from tests.common.test_sources import write_dicom
from tests.packages import META
from tests.plans import round_config

SCANNER = Scanner(gain=1.0, offset=0.0, gamma=1.0, blur=0.0, noise=0.03)
CHANGED = Scanner(gain=0.6, offset=0.15, gamma=1.0, blur=1.5, noise=0.03)


def write_export(folder: Path, *, n: int, seed: int, scanner: Scanner = SCANNER, vendor: str = "Acme",
                 spacing: float = 0.2, prevalence: float = 0.5, dated: bool = True, stripped: bool = False) -> Path:  # fmt: skip
    """A hospital's DICOM export of synthetic images: one image per patient, labels.csv, site.yaml."""
    rng = np.random.default_rng(seed)
    clean, labels, _ = synthetic_images_with_findings(n, prevalence, 28, rng)
    images = acquire(clean, scanner, rng)
    rows = []
    for i in range(n):
        path = write_dicom(folder / "export" / f"P{i:04d}.dcm", images[i], patient_id=f"P{seed}-{i:04d}")
        ds = pydicom.dcmread(path)
        ds.Manufacturer, ds.ManufacturerModelName, ds.KVP = vendor, f"{vendor} DR-1", 80
        ds.PixelSpacing = [spacing, spacing]
        if dated:
            ds.AcquisitionDate = "20261125" if i % 2 else "20261001"
        if stripped:  # an export tool that drops the vendor's tags
            del ds.Manufacturer, ds.ManufacturerModelName, ds.KVP
        ds.save_as(path, enforce_file_format=True)
        rows.append((f"P{i:04d}.dcm", f"P{seed}-{i:04d}", ["normal", "finding"][labels[i]]))
    with (folder / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("file", "patient_id", "label"), *rows])
    config = {"site": "hospital-a", "state_dir": str(folder.parent / "state"), "privacy": {"required": False},
              "data": {"format": "dicom", "root": "export", "labels": "labels.csv", "classes": ["normal", "finding"],
                       "preprocess": {"size": [28, 28]}}}  # fmt: skip
    (folder / "site.yaml").write_text(yaml.safe_dump(config))
    return folder / "site.yaml"


@pytest.fixture(scope="module")
def trained_site(tmp_path_factory):
    """The site trained one round of study 'monitor-study' on its export; the package of that study."""
    tmp = tmp_path_factory.mktemp("monitor")
    site_config = write_export(tmp / "first", n=240, seed=0)
    runtime = SiteRuntime.load(load_site(site_config))
    model = build_model("cnn28", seed=0)
    reply = runtime.train(
        round_config(study_id="monitor-study", local_epochs=3, lr=0.003), model.state_dict()
    )
    assert not reply.refused, reply.refused
    model.load_state_dict(reply.weights)
    meta = {**META, "study": {"id": "monitor-study", "name": "monitor"},
            "performance": {"sites": {"hospital-a": {"auc": 0.9, "auc_ci": [0.85, 0.95]}}}}  # fmt: skip
    return tmp, site_config, write_package(tmp / "package", model, meta)


def _run(site_config, package, tmp, data=None, extra=()) -> tuple[int, dict]:
    out = tmp / f"out-{len(list(tmp.glob('out-*')))}"
    args = ["site", "monitor", str(site_config), "--package", str(package), "--out", str(out), *extra]
    code = fedward([*args, *(["--data", str(data)] if data else [])])
    doc = json.loads((out / "monitor.json").read_text()) if (out / "monitor.json").exists() else {}
    if doc:
        assert (out / "report.html").read_text().count("<figure") == len(doc["drifting"]) + len(
            doc["watch"]
        ) - ("auc (performance)" in doc["drifting"])  # a plot per drifting or to-watch distribution
    return code, doc


def test_the_site_kept_what_it_trained_on_and_a_new_export_of_the_same_scanner_does_not_drift(trained_site):
    tmp, site_config, package = trained_site
    assert (tmp / "state" / "profiles" / "monitor-study.json").is_file()
    same = write_export(tmp / "same", n=200, seed=1)
    code, doc = _run(site_config, package, tmp, data=same)
    assert code == 0 and doc["status"] == "stable" and doc["drifting"] == [], doc["drifting"]
    assert {f["feature"] for f in doc["features"]} >= {"manufacturer", "kvp", "pixel_spacing", "intensity_mean",
                                                       "class share", "P(finding)", "auc (performance)"}  # fmt: skip
    assert doc["current"]["images"] == 200 and doc["reference"]["n_train"] > 100


def test_a_changed_scanner_is_flagged_on_its_acquisition_and_intensity_features(trained_site):
    tmp, site_config, package = trained_site
    changed = write_export(tmp / "changed", n=200, seed=2, scanner=CHANGED, vendor="Other", spacing=0.3)
    code, doc = _run(site_config, package, tmp, data=changed)
    assert code == 1 and doc["status"] == "drift"
    assert {"manufacturer", "model", "pixel_spacing", "intensity_mean", "intensity_p95"} <= set(
        doc["drifting"]
    )
    assert (
        "class share" not in doc["drifting"] and "kvp" not in doc["drifting"]
    )  # the same prevalence and kVp


def test_another_prevalence_is_flagged_on_the_labels_not_on_the_scanner(trained_site):
    tmp, site_config, package = trained_site
    skewed = write_export(tmp / "skewed", n=200, seed=3, prevalence=0.9)
    code, doc = _run(site_config, package, tmp, data=skewed)
    assert code == 1 and "class share" in doc["drifting"]
    assert "P(finding)" in doc["drifting"]  # the package sees more findings
    # the scanner did not change (the findings themselves do brighten some intensity features)
    assert not {"manufacturer", "model", "pixel_spacing", "kvp", "photometric"} & set(doc["drifting"])


def test_missing_metadata_and_dates_are_said_and_the_last_days_are_chosen_by_date(trained_site):
    tmp, site_config, package = trained_site
    undated = write_export(tmp / "undated", n=60, seed=4, dated=False)
    code, doc = _run(site_config, package, tmp, data=undated, extra=("--days", "30"))
    assert code == 2 and doc == {}  # no acquisition dates: a clear error, nothing written
    stripped = write_export(tmp / "stripped", n=60, seed=7, stripped=True)
    code, doc = _run(site_config, package, tmp, data=stripped)
    assert code == 0 and any("'manufacturer' is missing in every current image" in n for n in doc["notes"])
    assert "manufacturer" not in {f["feature"] for f in doc["features"]}  # said, not guessed
    assert "pixel_spacing" in {f["feature"] for f in doc["features"]}  # what the export kept is compared
    dated = write_export(tmp / "dated", n=60, seed=5)
    from datetime import date

    recent = monitor(
        load_site(site_config), package, data_config=str(dated), days=30, today=date(2026, 12, 1)
    )
    assert recent["current"]["images"] == 30  # the images of 2026-11-25, not those of 2026-10-01
    nowhere = SiteConfig(site="hospital-a", state_dir=str(tmp / "nowhere"))
    with pytest.raises(MonitorError, match="kept no record"):
        monitor(nowhere, package)
    # a site with no record names the export the package was trained on instead
    named = monitor(nowhere, package, data_config=str(dated), reference_config=str(site_config))
    assert named["reference"]["source"] == str(site_config) and "manufacturer" not in named["drifting"]


def test_the_population_stability_index_is_zero_for_equal_shares_and_grows_with_the_shift():
    same = psi(np.array([50, 50]), np.array([100, 100]))
    small, large = psi(np.array([50, 50]), np.array([60, 40])), psi(np.array([50, 50]), np.array([90, 10]))
    assert same == pytest.approx(0.0) and 0 < small < 0.1 < 0.25 < large


def test_a_monitoring_run_is_logged_to_mlflow_and_an_unreachable_store_stops_nothing(trained_site, capsys):
    from mlflow.tracking import MlflowClient

    from server.processes import free_port

    tmp, site_config, package = trained_site
    same = write_export(tmp / "tracked", n=60, seed=6)
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    code, doc = _run(site_config, package, tmp, data=same, extra=("--mlflow", store))
    assert code == 0
    (run,) = MlflowClient(store).search_runs(
        MlflowClient(store).get_experiment_by_name("fedward").experiment_id
    )
    assert run.data.tags["fedward.kind"] == "monitor" and run.data.params["site"] == "hospital-a"
    assert run.data.metrics["psi/intensity_mean"] == pytest.approx(
        next(f["psi"] for f in doc["features"] if f["feature"] == "intensity_mean")
    )
    assert {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)} == {
        "monitor.json",
        "report.html",
    }
    capsys.readouterr()
    code, doc = _run(
        site_config, package, tmp, data=same, extra=("--mlflow", f"http://127.0.0.1:{free_port()}")
    )
    said = " ".join(capsys.readouterr().out.split())
    assert code == 0 and doc["status"] == "stable"  # the monitoring ran all the same
    assert said.count("cannot be reached") == 1 and "this run is not tracked" in said
