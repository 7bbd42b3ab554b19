"""`fedward validate` and `fedward compare` end to end on Flower's simulation engine: packages evaluated
at every site under each site's own evaluation policy (one site releases exact aggregates, the other
noised ones charged to its ledger), the report, and the promotion verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.ledger import LEDGER_FILENAME
from client.train import predict
from common.config import load_study
from common.data import load_site_data
from common.metrics import site_summary
from common.models import build_model
from common.package import load_package, write_package
from common.simulated import simulated_sites
from tests.conftest import run_fedward

SITES = ["hospital-a", "hospital-b"]
STUDY = """
name: {name}
seed: 0
rounds: 3
min_sites: 2
data:
  num_sites: 2
  synthetic: {{train_per_site: 200, test_per_site: 150, val_per_site: 0}}
  {site_configs}
train: {{local_epochs: 2, batch_size: 32, lr: 0.002}}
simulation: {{client_cpus: 1}}
"""


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> tuple[Path, dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("validate")
    train = tmp / "train.yaml"
    train.write_text(STUDY.format(name="trained", site_configs=""))
    proc = run_fedward("simulate", str(train), "--out", str(tmp / "trained"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    trained = tmp / "trained" / "model"
    _, meta = load_package(trained)  # the same model untrained: what a bad candidate looks like
    untrained = write_package(tmp / "untrained" / "model", build_model("cnn28", num_classes=2, seed=7),
                              {**meta, "study": {"id": "untrained-0", "name": "untrained"}})  # fmt: skip
    # hospital-a releases exact aggregates; hospital-b noised ones (less noise than its default, a larger
    # budget), charged
    (tmp / "a.yaml").write_text("site: hospital-a\nprivacy: {evaluation: {release: exact}}\n")
    (tmp / "b.yaml").write_text(
        "site: hospital-b\nprivacy: {evaluation: {release: dp_histogram, noise: 0.5, max_epsilon: 50}}\n"
    )
    study = tmp / "validate.yaml"
    study.write_text(
        STUDY.format(name="validate", site_configs=f"site_configs: [{tmp / 'a.yaml'}, {tmp / 'b.yaml'}]")
    )
    out = tmp / "out"
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = run_fedward("validate", str(trained), str(untrained), "--study", str(study), "--out", str(out),
                       "--mlflow", store)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, json.loads((out / "validation.json").read_text()), study, trained


@pytest.mark.slow
def test_each_package_is_evaluated_at_every_site_as_evaluating_it_directly(validated):
    out, doc, study, trained = validated
    assert doc["status"] == "completed" and doc["sites"] == SITES and doc["metric"] == "auc"
    assert [e["label"] for e in doc["packages"]] == ["trained", "untrained"]
    data = {s.site: load_site_data(s) for s in simulated_sites(load_study(study))}
    for entry in doc["packages"]:
        model, _ = load_package(entry["package"])
        for s in SITES:
            direct = site_summary(data[s].test_y.numpy(), predict(model, data[s].test_x))
            got = entry["sites"][s]
            if s == "hospital-a":  # an exact release: the very metrics of evaluating the package directly
                assert got["release"] == "exact" and got["auc"] == pytest.approx(direct["auc"], abs=1e-6)
                assert got["n_test"] == len(data[s].test_y)
            else:  # a noised release of coarse bins: its own numbers, with the interval they allow
                assert got["release"] == "dp_histogram" and got["noise_sd"]["auc"] > 0
            assert got["auc_ci"][0] <= got["auc"] <= got["auc_ci"][1]
    assert (
        doc["packages"][0]["sites"]["hospital-a"]["auc"]
        > 0.8
        > doc["packages"][1]["sites"]["hospital-a"]["auc"]
    )


@pytest.mark.slow
def test_the_noised_releases_are_charged_to_the_sites_ledger_and_nothing_is_trained(validated):
    out, doc, _, _ = validated
    lines = [json.loads(x) for x in (out / "sites" / "hospital-b" / LEDGER_FILENAME).read_text().splitlines()]
    assert [(x["kind"], x["study"]) for x in lines] == [
        ("evaluation", doc["validation_id"])
    ] * 2  # one per package
    exact = [json.loads(x) for x in (out / "sites" / "hospital-a" / LEDGER_FILENAME).read_text().splitlines()]
    # an exact release is written too, as unbounded (noise 0): one per package
    assert [(x["kind"], x["noise_multiplier"], x["study"]) for x in exact] == [
        ("evaluation-nonprivate", 0.0, doc["validation_id"])
    ] * 2
    assert not any(out.glob("**/final_model.pt")) and not any((out / "checkpoints").iterdir())
    html = (out / "report.html").read_text()
    assert (
        "fedward validation" in html
        and "untrained" in html
        and (out / "validation.png").stat().st_size > 5000
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("fedward").experiment_id)
    assert run.data.tags["fedward.kind"] == "validation"
    assert run.data.metrics["trained/hospital-a/auc"] == pytest.approx(
        doc["packages"][0]["sites"]["hospital-a"]["auc"]
    )
    rebuilt = run_fedward("report", str(out))
    assert rebuilt.returncode == 0 and (out / "report.html").read_text() == html


@pytest.mark.slow
def test_compare_promotes_only_a_better_model(validated, tmp_path):
    out = validated[0]
    worse = run_fedward("compare", str(out), str(out), "--old-package", "trained", "--new-package", "untrained",
                        "--out", str(tmp_path / "worse.json"))  # fmt: skip
    assert worse.returncode == 1, worse.stdout
    verdict = json.loads((tmp_path / "worse.json").read_text())
    assert not verdict["promote"] and verdict["sites"]["hospital-a"]["verdict"] == "worse"
    assert "do not promote" in worse.stdout and "hospital-a: NEW is significantly worse" in " ".join(
        worse.stdout.split()
    )
    better = run_fedward("compare", str(out), str(out), "--old-package", "2", "--new-package", "1")
    assert better.returncode == 0 and "promote" in better.stdout, better.stdout
    same = run_fedward("compare", str(out), str(out), "--old-package", "1", "--new-package", "1")
    assert same.returncode == 1 and "not significantly better anywhere" in " ".join(same.stdout.split())
    assert np.isfinite(verdict["sites"]["pooled"]["difference"])
