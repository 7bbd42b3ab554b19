"""A study that starts from a model package (`model.init_from`), through Flower's simulation engine:
round 1 starts from the package's weights, the sites' privacy ledgers go on, and results, package
and model card name the package it started from."""

from __future__ import annotations

import json

import pytest

from client.ledger import LEDGER_FILENAME
from tests.conftest import run_fedward

SITES = ["hospital-a", "hospital-b"]
STUDY = """
name: {name}
seed: 0
rounds: {rounds}
min_sites: 2
data:
  num_sites: 2
  synthetic: {{train_per_site: 100, test_per_site: 60, val_per_site: 40}}
train: {{local_epochs: 1, batch_size: 25, lr: 0.002}}
privacy: {{enabled: true, target_epsilon: 2.0, delta: 1.0e-5}}
simulation: {{client_cpus: 1}}
{model}
"""


@pytest.mark.slow
def test_a_study_continues_from_a_package_its_weights_and_its_ledgers(tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text(STUDY.format(name="first", rounds=2, model=""))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_fedward("simulate", str(first), "--out", str(tmp_path / "a"), "--mlflow", store)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    then = tmp_path / "then.yaml"
    then.write_text(
        STUDY.format(name="then", rounds=1, model=f"model: {{init_from: {tmp_path / 'a' / 'model'}}}")
    )
    proc = run_fedward("simulate", str(then), "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    # round 1 starts from the package: the first evaluation is the package's own final evaluation
    for s in SITES:
        assert b["initial"]["sites"][s]["auc"] == pytest.approx(a["final"]["sites"][s]["auc"], abs=1e-9)
    assert b["init_from"]["study_id"] == a["study_id"] and len(b["init_from"]["sha256"]) == 64
    # the ledgers go on: the first study's lines, then the second's; epsilon is of both
    for s in SITES:
        lines = [
            json.loads(x) for x in (tmp_path / "b" / "sites" / s / LEDGER_FILENAME).read_text().splitlines()
        ]
        studies = [line["study"] for line in lines]
        assert studies[: studies.index(b["study_id"])] == [a["study_id"]] * studies.index(b["study_id"])
        assert b["final"]["sites"][s]["epsilon"] > a["final"]["sites"][s]["epsilon"] > 0
    package = json.loads((tmp_path / "b" / "model" / "package.json").read_text())
    assert [e["study_id"] for e in package["lineage"]] == [a["study_id"]]
    assert (
        f"Started from the package {tmp_path / 'a' / 'model'}"
        in (tmp_path / "b" / "model" / "MODEL_CARD.md").read_text()
    )

    # the first study is in MLflow: per-site metrics per round, epsilon, results and the model card
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name("fedward").experiment_id)
    assert run.data.params["model.name"] == "cnn28" and run.data.tags["fedward.kind"] == "simulate"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "auc/hospital-a")] == [0, 1, 2]
    eps = client.get_metric_history(run.info.run_id, "epsilon/hospital-a")
    assert eps[-1].value == pytest.approx(a["final"]["sites"]["hospital-a"]["epsilon"])
    assert {x.path for x in client.list_artifacts(run.info.run_id)} >= {
        "results.json",
        "model_card.html",
        "MODEL_CARD.md",
    }
