"""`fedward study` over hospitals' own site configs: every private run is charged to each site's real
ledger, study.json says what the whole study spent per site, and a run a site's policy forbids stops
the study before anything trains, naming the site and the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.ledger import TRAINING_KINDS, SiteAccountant
from common.privacy import rdp_epsilon
from tests.conftest import run_fedward

SITE = """
site: {name}
data: {{format: synthetic, partition: {{index: {index}, num_sites: 2}}, synthetic: {{train_per_site: 60, test_per_site: 30}}}}
privacy: {{max_epsilon: 30.0}}
state_dir: {state}
"""
STUDY = """
name: sites-study
rounds: 2
min_sites: 2
classes: [normal, finding]
data: {{source: sites, site_configs: [{a}, {b}]}}
model: {{name: cnn28-small}}
train: {{local_epochs: 1, batch_size: 20}}
privacy: {{enabled: true, target_epsilon: 6.0}}
simulation: {{client_cpus: 1}}
study: {{local: true, centralized: {centralized}, leave_one_out: false, bootstrap_samples: 100}}
"""


def _setup(tmp_path: Path, centralized: bool) -> tuple[Path, dict[str, Path]]:
    states = {}
    paths = []
    for index, name in enumerate(("hospital-a", "hospital-b")):
        states[name] = tmp_path / "ledgers" / name
        path = tmp_path / f"{name}.yaml"
        path.write_text(SITE.format(name=name, index=index, state=states[name]))
        paths.append(path)
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(a=paths[0], b=paths[1], centralized=str(centralized).lower()))
    return study, states


@pytest.mark.slow
def test_every_private_run_of_the_study_is_charged_to_the_sites_real_ledgers(tmp_path):
    study, states = _setup(tmp_path, centralized=False)

    proc = run_fedward("study", str(study), "--out", str(tmp_path / "out"), timeout=900)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    federated_id = doc["models"]["federated-dp"]["results"]["study_id"]
    for site, state in states.items():
        entries = SiteAccountant(state).ledger.entries()
        local_id = doc["models"][f"local-dp:{site}"]["study_id"]
        assert {e.study for e in entries if e.kind == "train"} == {federated_id, local_id}
        # the whole study: both runs' lines composed, within the site's budget
        composed = rdp_epsilon(
            [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.kind in TRAINING_KINDS],
            delta=1e-5,
        )
        spent = doc["privacy_spent"][site]
        assert spent["study_epsilon"] == pytest.approx(composed, rel=1e-6)
        assert spent["site_total_epsilon"] == pytest.approx(
            composed, rel=1e-6
        )  # a fresh ledger: this study only
        assert spent["study_epsilon"] > doc["models"][f"local-dp:{site}"]["epsilon"]  # more than one run
        assert spent["study_epsilon"] <= spent["max_epsilon"]
    assert not (tmp_path / "out" / "federated-dp" / "sites").exists()  # no fresh ledgers beside the real ones


@pytest.mark.slow
def test_a_reference_the_sites_policy_forbids_stops_the_study_before_training(tmp_path):
    study, states = _setup(tmp_path, centralized=True)

    proc = run_fedward("study", str(study), "--out", str(tmp_path / "out"), timeout=300)

    assert proc.returncode == 2
    text = " ".join(proc.stdout.split())
    assert "centralized" in text and "hospital-a" in text and "privacy.required" in text
    assert all(not (state / "privacy-ledger.jsonl").exists() for state in states.values())
