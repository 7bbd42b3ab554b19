"""Privacy across the whole study, enforced by each site: real Opacus, real ledgers, Flower's engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.ledger import PrivacyLedger
from tests.conftest import run_fedward

STUDY = """
name: dp-test
rounds: 3
min_sites: 2
data:
  num_sites: {n}
  synthetic: {{train_per_site: 200, test_per_site: 80}}
  site_configs: [{sites}]
train: {{local_epochs: 1, batch_size: 25, lr: 0.002}}
privacy:
  enabled: true
  target_epsilon: 8.0
  delta: 1.0e-5
  max_grad_norm: 1.0
  noise_multiplier: {noise}
"""

SITE = """
site: {name}
privacy: {{max_epsilon: {max_eps}, delta: 1.0e-5, min_noise_multiplier: {min_noise}, max_grad_norm: 1.0}}
"""


def _study(tmp_path: Path, policies: list[tuple[str, float, float]], noise: float = 0.0) -> Path:
    paths = []
    for name, max_eps, min_noise in policies:
        p = tmp_path / f"{name}.yaml"
        p.write_text(SITE.format(name=name, max_eps=max_eps, min_noise=min_noise))
        paths.append(str(p))
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(n=len(paths), sites=", ".join(paths), noise=noise))
    return study


def _fresh_epsilon(ledger: Path, delta: float = 1e-5) -> tuple[float, int]:
    entries = PrivacyLedger(ledger).entries()
    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    return accountant.get_epsilon(delta=delta), len(entries)


@pytest.mark.slow
def test_sites_enforce_their_policy_and_report_the_whole_study_epsilon(tmp_path):
    # a and b accept; c demands more noise than asked; d's budget allows one round only
    study = _study(tmp_path, [("a", 10, 0.5), ("b", 10, 0.5), ("c", 10, 5.0), ("d", 6.0, 0.5)])
    out = tmp_path / "out"
    proc = run_fedward("simulate", str(study), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = results["rounds"]

    # whole-study epsilon: reported == a fresh Opacus accountant over the ledger, > one round's
    for site in ("a", "b"):
        epsilon, n = _fresh_epsilon(out / "sites" / site / "privacy-ledger.jsonl")
        assert n == 3
        assert rounds[-1]["sites"][site]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
        assert results["final"]["sites"][site]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
        assert epsilon > rounds[0]["sites"][site]["epsilon"] * 1.1
        assert epsilon <= 8.0 + 1e-6  # noise derived for all planned rounds meets the target
        assert all(r["sites"][site]["steps"] == 8 and r["sites"][site]["refused"] is None for r in rounds)

    # c refuses every round: the coordinator asked for less noise than its policy allows
    for r in rounds:
        assert "c" not in r["participants"]
        assert "noise multiplier" in r["sites"]["c"]["refused"] and "minimum 5" in r["sites"]["c"]["refused"]
    assert not (out / "sites" / "c" / "privacy-ledger.jsonl").exists()
    assert results["final"]["sites"]["c"]["epsilon"] == 0.0

    # d trains round 1, then refuses: the next round would take it past its budget of 6
    assert "d" in rounds[0]["participants"]
    for r in rounds[1:]:
        assert "d" not in r["participants"] and "budget" in r["sites"]["d"]["refused"].lower()
    epsilon_d, n_d = _fresh_epsilon(out / "sites" / "d" / "privacy-ledger.jsonl")
    assert n_d == 1 and epsilon_d <= 6.0
    assert results["final"]["sites"]["d"]["epsilon"] == pytest.approx(epsilon_d, rel=1e-9)
    assert "refused" in proc.stdout and "ε" in proc.stdout


@pytest.mark.slow
def test_a_restarted_site_continues_its_epsilon_from_its_state_folder(tmp_path):
    study = _study(tmp_path, [("a", 20, 0.5), ("b", 20, 0.5)], noise=1.0)
    out = tmp_path / "out"
    first = run_fedward("simulate", str(study), "--out", str(out), "--rounds", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    ledger = out / "sites" / "a" / "privacy-ledger.jsonl"
    before = ledger.read_text().splitlines()
    assert len(before) == 2

    # a new coordinator process and new site processes; only the state folders carry over
    second = run_fedward("simulate", str(study), "--out", str(out), "--rounds", "3", "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    after = ledger.read_text().splitlines()
    assert after[:2] == before and len(after) == 3
    epsilon, _ = _fresh_epsilon(ledger)
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["rounds"][2]["sites"]["a"]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert results["rounds"][2]["sites"]["a"]["epsilon"] > results["rounds"][1]["sites"]["a"]["epsilon"]
