"""Privacy across the whole study, enforced by each site: real Opacus, real ledgers, Flower's engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.ledger import TRAINING_KINDS, PrivacyLedger
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
privacy: {{max_epsilon: {max_eps}, delta: {delta}, min_noise_multiplier: {min_noise}, max_grad_norm: {clip}}}
"""


def _train_lines(ledger: Path) -> list:
    return [e for e in PrivacyLedger(ledger).entries() if e.kind == "train"]


def _released_count(ledger: Path) -> float:
    (count,) = [e.value for e in PrivacyLedger(ledger).entries() if e.kind == "count"]
    return count


def _study(tmp_path: Path, policies: list[tuple], noise: float = 0.0) -> Path:
    """policies: (name, max_epsilon, min_noise_multiplier[, max_grad_norm, delta]) per site."""
    paths = []
    for name, max_eps, min_noise, *rest in policies:
        clip, delta = rest or (1.0, "1.0e-5")  # YAML reads 1e-05 as a string: keep the dot
        p = tmp_path / f"{name}.yaml"
        p.write_text(SITE.format(name=name, max_eps=max_eps, min_noise=min_noise, clip=clip, delta=delta))
        paths.append(str(p))
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(n=len(paths), sites=", ".join(paths), noise=noise))
    return study


def _fresh_epsilon(ledger: Path, delta: float = 1e-5) -> tuple[float, int]:
    """Epsilon of every line of the ledger (the released count too) by a fresh Opacus accountant,
    and the number of training lines."""
    entries = [
        e for e in PrivacyLedger(ledger).entries() if e.kind in TRAINING_KINDS
    ]  # the training budget (private lines)
    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    return accountant.get_epsilon(delta=delta), len([e for e in entries if e.kind == "train"])


@pytest.mark.slow
def test_sites_enforce_their_policy_and_report_the_whole_study_epsilon(tmp_path):
    # a and b accept; c demands more noise than asked; d's budget allows one round only; e clips
    # tighter than asked (0.5 < 1.0); f's delta is smaller than asked (1e-6 < 1e-5)
    study = _study(
        tmp_path,
        [
            ("a", 10, 0.5),
            ("b", 10, 0.5),
            ("c", 10, 5.0),
            ("d", 6.0, 0.5),
            ("e", 10, 0.5, 0.5, "1.0e-5"),
            ("f", 10, 0.5, 1.0, "1.0e-6"),
        ],
    )
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
        assert epsilon <= 8.0 + 1e-6  # noise derived for all planned rounds (and the count) meets the target
        steps = math.ceil(_released_count(out / "sites" / site / "privacy-ledger.jsonl") / 25)  # batch 25
        assert all(r["sites"][site]["steps"] == steps and r["sites"][site]["refused"] is None for r in rounds)
        assert all(r["train"][site]["loss"] is None and r["train"][site]["train_s"] is None for r in rounds)

    # c refuses every round: the coordinator asked for less noise than its policy allows
    for r in rounds:
        assert "c" not in r["participants"]
        assert "privacy.min_noise_multiplier 5" in r["sites"]["c"]["refused"]
    assert _train_lines(out / "sites" / "c" / "privacy-ledger.jsonl") == []  # it only evaluated
    # but its refusal compares a noise derived from its noised count (the sample rate) with its minimum,
    # so it tells something of the count: the count, drawn once for the study, is charged and no more
    epsilon_c, _ = _fresh_epsilon(out / "sites" / "c" / "privacy-ledger.jsonl")
    assert _released_count(out / "sites" / "c" / "privacy-ledger.jsonl") > 0
    assert results["final"]["sites"]["c"]["epsilon"] == pytest.approx(epsilon_c, rel=1e-9) and epsilon_c < 0.5
    # e and f refuse every round, naming the field and what they allow
    for site, field in (("e", "privacy.max_grad_norm 0.5"), ("f", "privacy.delta 1e-06")):
        assert all(site not in r["participants"] and field in r["sites"][site]["refused"] for r in rounds), (
            site
        )
        assert _train_lines(out / "sites" / site / "privacy-ledger.jsonl") == []

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

    def training_lines() -> list[str]:  # its evaluations spend the other budget, in lines of their own
        return [line for line in ledger.read_text().splitlines() if '"kind": "evaluation"' not in line]

    before = training_lines()
    assert len(before) == 3  # the released count and two rounds

    # a new coordinator process and new site processes; only the state folders carry over
    second = run_fedward("simulate", str(study), "--out", str(out), "--rounds", "3", "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    after = training_lines()
    assert after[:3] == before and len(after) == 4  # the count is not released again
    epsilon, _ = _fresh_epsilon(ledger)
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["rounds"][2]["sites"]["a"]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert results["rounds"][2]["sites"]["a"]["epsilon"] > results["rounds"][1]["sites"]["a"]["epsilon"]


PLAIN_STUDY = """
name: policy-test
rounds: 1
min_sites: 1
classes: [normal, finding]
data:
  source: sites
  site_configs: [{a}, {b}]
train: {{local_epochs: 1, batch_size: 16}}
privacy: {{enabled: {dp}, poisson_sampling: {poisson}, noise_multiplier: 1.0}}
"""
SYNTHETIC_SITE = """
site: {name}
data: {{format: synthetic, partition: {{index: {index}, num_sites: 2}}, synthetic: {{train_per_site: 48, test_per_site: 16}}}}
privacy: {{required: {required}}}
state_dir: {state}
"""


@pytest.mark.slow
def test_a_coordinator_cannot_switch_a_sites_privacy_off_in_a_real_simulation(tmp_path):
    paths = []
    for index, (name, required) in enumerate((("strict", "true"), ("lenient", "false"))):
        p = tmp_path / f"{name}.yaml"
        p.write_text(SYNTHETIC_SITE.format(name=name, index=index, required=required, state=tmp_path / name))
        paths.append(p)

    def simulate(dp: str, poisson: str) -> dict:
        study = tmp_path / f"study-{dp}-{poisson}.yaml"
        study.write_text(PLAIN_STUDY.format(a=paths[0], b=paths[1], dp=dp, poisson=poisson))
        out = tmp_path / f"out-{dp}-{poisson}"
        proc = run_fedward("simulate", str(study), "--out", str(out))
        assert proc.returncode in (0, 3), proc.stdout + proc.stderr
        return json.loads((out / "results.json").read_text())

    plain = simulate("false", "true")  # the coordinator asks for no privacy
    (round_,) = plain["rounds"]
    assert round_["participants"] == ["lenient"]
    assert "privacy.required" in round_["refused"]["strict"]
    strict = tmp_path / "strict" / "privacy-ledger.jsonl"  # it evaluated (protected), it never trained
    assert all('"kind": "evaluation"' in line for line in strict.read_text().splitlines())

    no_poisson = simulate("true", "false")  # privacy, but batches the epsilon does not describe
    assert no_poisson["status"] == "stopped"
    refused = no_poisson["stopped_rounds"][0]["refused"]
    assert set(refused) == {"strict", "lenient"} and all("Poisson sampling" in r for r in refused.values())
