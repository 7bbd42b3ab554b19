"""`fedward study` with personalization: a FedBN-style federation (each site's normalization its own)
and the federated model fine-tuned at each site under its privacy budget, compared with the others on
the same splits, and each site's best model chosen on its validation images."""

from __future__ import annotations

import json

import pytest
import torch

from client.ledger import LEDGER_FILENAME
from client.local_norm import norm_keys
from common.models import build_model, load_model
from tests.conftest import run_fedward

SITES = ["hospital-a", "hospital-b"]
STUDY = """
name: personal
seed: 0
rounds: 2
min_sites: 2
data:
  num_sites: 2
  synthetic: {train_per_site: 120, test_per_site: 80, val_per_site: 60}
train: {local_epochs: 1, batch_size: 32, lr: 0.003}
privacy: {enabled: true, target_epsilon: 8.0, delta: 1.0e-5}
simulation: {client_cpus: 1}
study: {bootstrap_samples: 200, leave_one_out: false, centralized: false, fedbn: true, fine_tune_epochs: 1}
"""


@pytest.fixture(scope="module")
def personal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("personal")
    (tmp / "study.yaml").write_text(STUDY)
    out = tmp / "out"
    proc = run_fedward("study", str(tmp / "study.yaml"), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "study.json").read_text())


@pytest.mark.slow
def test_the_personalized_models_are_compared_with_the_others_on_the_same_sites(personal):
    out, doc = personal
    comp = doc["comparison"]
    assert comp["columns"] == ["local-dp", "federated-dp", "fedbn", "fine-tuned"]
    for s in [*SITES, "pooled"]:
        assert {"fedbn_vs_local-dp", "fine-tuned_vs_local-dp"} <= set(comp["gains"][s])
        for c in ("fedbn", "fine-tuned"):
            cell = comp["rows"][s][c]
            assert cell["ci"][0] <= cell["auc"] <= cell["ci"][1]
    assert "The model for each site, chosen on its validation images" in (out / "report.html").read_text()


@pytest.mark.slow
def test_fedbn_models_are_the_global_model_with_each_sites_own_normalization(personal):
    out, doc = personal
    results = json.loads((out / "fedbn" / "results.json").read_text())
    for (
        s
    ) in SITES:  # the model tested here is the one the site evaluated with, its own normalization in place
        assert doc["models"][f"fedbn:{s}"]["eval"][s]["auc"] == pytest.approx(
            results["final"]["sites"][s]["auc"], abs=1e-6
        )
    final, _ = load_model(out / "fedbn" / "final_model.pt")
    initial = build_model("cnn28", seed=0).state_dict()
    for k in norm_keys(final):  # no site's normalization ever reached the coordinator
        assert torch.equal(final.state_dict()[k], initial[k]), k


@pytest.mark.slow
def test_fine_tuning_is_charged_to_each_sites_ledger_after_the_federation(personal):
    out, doc = personal
    study_id = doc["models"]["federated-dp"]["results"]["study_id"]
    for s in SITES:
        lines = [
            json.loads(x)
            for x in (out / "federated-dp" / "sites" / s / LEDGER_FILENAME).read_text().splitlines()
        ]
        train = [(x["round"], x["study"]) for x in lines if x["kind"] == "train"]
        assert train == [
            (1, study_id),
            (2, study_id),
            (3, study_id),
        ]  # the federation's two rounds, then the site's
        tuned = doc["models"][f"fine-tuned:{s}"]
        assert tuned["epsilon"] == pytest.approx(lines[-1]["epsilon"], rel=1e-6)
        assert tuned["epsilon"] > doc["models"]["federated-dp"]["epsilon"][s]


@pytest.mark.slow
def test_each_site_gets_its_best_model_on_validation_images(personal):
    _, doc = personal
    for s in SITES:
        best = doc["best_for_site"][s]
        assert set(best["validation"]) == {f"local-dp:{s}", "federated-dp", f"fedbn:{s}", f"fine-tuned:{s}"}
        assert best["validation"][best["model"]] == max(best["validation"].values())
        assert best["test"] == doc["models"][best["model"]]["eval"][s]["auc"]
    chosen = doc["chosen_pooled"]  # all test data, each site's scored by its own choice
    assert chosen["models"] == {s: doc["best_for_site"][s]["model"] for s in SITES}
    assert chosen["ci"][0] <= chosen["auc"] <= chosen["ci"][1]
    assert any(
        line.startswith("Each site's best model on its own validation images") for line in doc["summary"]
    )
