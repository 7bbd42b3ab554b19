"""Flower's Deployment Engine on loopback, real processes: a SuperLink with TLS and SuperNode
authentication, and at each site its own site service, a SuperNode and the runner of its ClientApps,
the last two as OS users of their own; studies submitted with `flwr run`. Sites that are not
registered or do not trust the CA are refused; a site killed mid-round does not stop the study and
rejoins; a coordinator killed mid-study resumes after its last finished round, ledgers exact; an app
the coordinator changed to read the site's files, keys and ledger, or to skip its privacy, gets
nothing. Run as root (the deployment makes the users fedward-node and fedward-app)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import yaml

from client.ledger import TRAINING_KINDS, LedgerWarning, SiteAccountant
from server.certs import make_credentials
from server.deploy import DeploymentError, LocalDeployment
from server.processes import Service
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("every_core")  # tests/conftest.py

SITES = ["hospital-a", "hospital-b", "hospital-c"]
TINY = {"train_per_site": 64, "test_per_site": 32, "image_size": 28}


def write_sites(folder: Path) -> Path:
    """Three synthetic hospitals, partition i of 3 each, each with its own privacy policy."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, site in enumerate(SITES):
        config = {
            "site": site,
            "data": {
                "format": "synthetic",
                "partition": {"index": i, "num_sites": 3, "seed": 0},
                "synthetic": TINY,
            },
            "privacy": {"max_epsilon": 40.0 + 10 * i, "min_noise_multiplier": 0.5},
        }
        (folder / f"{site}.yaml").write_text(yaml.safe_dump(config))
    return folder


def write_study(path: Path, *, rounds: int, timeout_s: float, privacy: bool = True) -> Path:
    study = {
        "name": path.stem,
        "seed": 0,
        "rounds": rounds,
        "min_sites": 2,
        "round_timeout_s": timeout_s,
        "data": {"source": "synthetic", "num_sites": 3, "synthetic": TINY},
        "model": {"name": "cnn28"},
        "train": {"local_epochs": 1, "batch_size": 32},
    }
    if privacy:
        study["privacy"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    path.write_text(yaml.safe_dump(study))
    return path


def our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a test's own folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in text and state != "Z" and str(os.getpid()) != cmdline.parent.name:
            found.append(text)
    return found


def wait_for(condition, timeout: float, what: str, every: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def ensure_online(dep: LocalDeployment) -> None:
    """Every site's SuperNode running (an earlier test may have killed one)."""
    for site in dep.sites:
        if not dep.services[f"supernode-{site}"].alive():
            dep.rejoin(site)


def released_count(state_dir: Path) -> int:
    """The noised training-set size a site released for its study (the only line of kind count)."""
    (count,) = [e.value for e in SiteAccountant(state_dir).ledger.entries() if e.kind == "count"]
    return int(count)


@pytest.fixture(scope="module")
def reachable(tmp_path_factory):
    """Folders the deployment's other users can enter (pytest's own are closed to them)."""
    made = []

    def make(name: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"fedward-{name}-", dir="/tmp"))
        folder.chmod(0o755)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def site_templates(tmp_path_factory) -> Path:
    return write_sites(tmp_path_factory.mktemp("site-templates"))


@pytest.fixture(scope="module")
def superlink(reachable, site_templates):
    """A SuperLink with TLS and authentication, hospital-a registered, no SuperNode running."""
    with LocalDeployment(reachable("link"), site_templates=site_templates) as dep:
        dep.prepare()
        dep.start_superlink()
        dep.register("hospital-a")
        dep.start_site_service("hospital-a")
        yield dep


@pytest.fixture(scope="module")
def deployment(reachable, site_templates):
    """The SuperLink, every site's service and SuperNode online; every process stopped afterwards."""
    with LocalDeployment(reachable("deploy"), site_templates=site_templates) as dep:
        dep.start_all()
        yield dep


def online_nodes(dep: LocalDeployment) -> dict[int, str]:
    proc = dep.flwr("supernode", "list", "fedward-local", "--format", "json")
    return {int(n["node-id"]): n["status"] for n in json.loads(proc.stdout)["nodes"]}


def test_a_supernode_whose_key_is_not_registered_is_refused(superlink, tmp_path):
    intruder = make_credentials(tmp_path, ["intruder"])  # its own key; it trusts the study's CA

    node = superlink.start_supernode(
        "hospital-a", key=intruder.site_keys["intruder"], name="unregistered", wait=False
    )
    node.proc.wait(timeout=60)

    assert node.proc.returncode != 0
    assert "Failed to activate SuperNode" in node.log_text()
    assert "SuperNode ID" not in node.log_text()
    assert online_nodes(superlink) == {superlink.node_ids["hospital-a"]: "registered"}  # never came online


def test_a_supernode_that_does_not_trust_the_ca_cannot_connect(superlink, tmp_path):
    other = make_credentials(tmp_path, ["hospital-a"])  # a CA of another study

    node = superlink.start_supernode(
        "hospital-a",
        ca=other.site_cas["hospital-a"],  # the site's registered key, the wrong trust anchor
        name="untrusting",
        wait=False,
        extra_args=("--max-retries", "1"),
    )
    node.proc.wait(timeout=60)

    assert node.proc.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node.log_text()
    assert online_nodes(superlink) == {superlink.node_ids["hospital-a"]: "registered"}


def test_insecure_mode_is_explicit_and_warns(reachable, site_templates):
    folder = reachable("insecure")
    with pytest.warns(UserWarning, match="INSECURE deployment"):
        dep = LocalDeployment(folder, site_templates=site_templates, insecure=True)
    dep.prepare()

    assert "insecure = true" in (folder / "flwr-cli" / "config.toml").read_text()
    assert not (folder / "certs").exists()
    secure = LocalDeployment(folder / "secure", site_templates=site_templates)
    secure.prepare()
    assert "root-certificates" in (folder / "secure" / "flwr-cli" / "config.toml").read_text()
    with pytest.warns(UserWarning, match="NOT ISOLATED"):
        LocalDeployment(folder / "open", site_templates=site_templates, isolated=False)


def test_a_deployment_folder_the_sites_users_cannot_enter_is_refused(tmp_path, site_templates):
    dep = LocalDeployment(tmp_path / "closed", site_templates=site_templates)  # pytest's folders are 0700

    with pytest.raises(DeploymentError, match="cannot enter"):
        dep.prepare()


@pytest.mark.slow
def test_deploy_local_runs_two_rounds_over_tls_with_all_three_sites(reachable, tmp_path, site_templates):
    study = write_study(tmp_path / "two-rounds.yaml", rounds=2, timeout_s=180)
    out = reachable("deploy-local") / "deploy"

    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "deploy-local", "--out", str(out), "--study", str(study)]
        + ["--sites-dir", str(site_templates)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for record in results["rounds"]:
        assert record["participants"] == SITES
        # each site's noised, released size (charged to its ledger), never the exact 64; no loss, no time
        counts = {s: released_count(out / "sites" / s / "state") for s in SITES}
        assert {s: t["n_train"] for s, t in record["train"].items()} == counts
        assert all(t["loss"] is None and t["train_s"] is None for t in record["train"].values())
    assert sorted(results["final"]["sites"]) == SITES
    for metrics in results["final"]["sites"].values():
        # each hospital's default evaluation release: noised histograms, charged to its ledger
        assert metrics["release"] == "dp_histogram" and metrics["evaluation_epsilon"] > 0
        assert abs(metrics["n_test"] - 32) < 32 and metrics["noise_sd"]["auc"] is not None
    link_log = (out / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in link_log and "--enable-supernode-auth" in link_log
    assert "TLS, SuperNode authentication" in proc.stdout
    assert our_processes(str(out)) == []  # the command stopped everything it started


@pytest.mark.slow
def test_a_site_whose_service_is_down_fails_clearly_at_the_coordinator_and_keeps_its_ledger(
    deployment, tmp_path
):
    ensure_online(deployment)
    ledger = deployment.state_dir("hospital-c") / "privacy-ledger.jsonl"
    before = ledger.read_bytes() if ledger.exists() else b""
    deployment.services["site-hospital-c"].stop()  # the hospital's own process is down; its SuperNode is up
    try:
        study = write_study(tmp_path / "down.yaml", rounds=1, timeout_s=90)
        run = deployment.submit(study, tmp_path / "out")
        run.proc.wait(timeout=600)
    finally:
        deployment.start_site_service("hospital-c")

    assert run.proc.returncode == 0, run.tail()
    (first,) = json.loads((tmp_path / "out" / "results.json").read_text())["rounds"]
    assert first["participants"] == ["hospital-a", "hospital-b"]
    (reason,) = first["failed"].values()  # the forwarder's own words reach the coordinator
    assert "hospital-c/socket/site.sock" in reason and "cannot be reached" in reason, reason
    assert "fedward site serve" in reason, reason
    assert (ledger.read_bytes() if ledger.exists() else b"") == before  # nothing trained, nothing charged


@pytest.mark.slow
def test_a_site_killed_mid_round_does_not_stop_the_study_and_rejoins(deployment, tmp_path):
    ensure_online(deployment)
    timeout_s = 45.0  # longer than a healthy round phase here
    # 3 rounds: a killed SuperNode stays "online" at the SuperLink for up to a minute (two missed
    # heartbeats), so the round after the kill may still address the dead node; the one after it not
    study = write_study(tmp_path / "kill.yaml", rounds=3, timeout_s=timeout_s)
    victim = deployment.services["supernode-hospital-c"]
    service = deployment.services["site-hospital-c"]
    mark = len(victim.log_text())

    run = deployment.submit(study, tmp_path / "out")
    wait_for(
        lambda: "Receiving: train message" in victim.log_text()[mark:], 300, "round 1 to reach hospital-c"
    )
    deployment.kill("supernode-hospital-c")  # mid-round: its ClientApp is training
    rejoined: list[Service] = []
    thread = threading.Thread(target=lambda: rejoined.append(deployment.rejoin("hospital-c", timeout=240)))
    thread.start()
    try:
        run.proc.wait(timeout=600)
    finally:
        thread.join(timeout=300)

    assert run.proc.returncode == 0, run.tail()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "completed"
    first, *later = results["rounds"]
    assert first["participants"] == ["hospital-a", "hospital-b"]
    assert "hospital-c" in first["failed"]
    assert results["timing"]["round_s"][0] < 2 * timeout_s  # waited for the dead site once, not twice
    assert rejoined and rejoined[0].alive()
    # the hospital's site service outlived its killed SuperNode (the same process) and trained on for
    # the rejoined node: its ledger holds the last round of this study
    assert deployment.services["site-hospital-c"] is service and service.alive()
    lines = SiteAccountant(deployment.state_dir("hospital-c")).ledger.entries()
    assert later[-1]["round"] in {
        e.round for e in lines if e.study == results["study_id"] and e.kind == "train"
    }
    assert later[-1]["participants"] == SITES  # back in a later round
    assert sorted(later[-1]["sites"]) == SITES and sorted(results["final"]["sites"]) == SITES


@pytest.mark.slow
def test_a_restarted_coordinator_resumes_after_the_last_finished_round(deployment, tmp_path):
    ensure_online(deployment)
    study = write_study(tmp_path / "restart.yaml", rounds=2, timeout_s=180, privacy=True)
    out = tmp_path / "out"

    def ledger(site: str, study_id: str) -> list:
        with warnings.catch_warnings():  # a line being appended right now reads as torn: not yet there
            warnings.simplefilter("ignore", LedgerWarning)
            entries = SiteAccountant(deployment.state_dir(site)).ledger.entries()
        return [
            e for e in entries if e.study == study_id and e.kind in TRAINING_KINDS
        ]  # the training budget's

    def round_2_trained_everywhere() -> bool:
        if not (out / "results.json").exists():
            return False
        study_id = json.loads((out / "results.json").read_text())["study_id"]
        return all(any(e.kind == "train" and e.round == 2 for e in ledger(site, study_id)) for site in SITES)

    run = deployment.submit(study, out)
    # Every site has trained round 2 and counted it; the coordinator has not finished the round yet.
    wait_for(round_2_trained_everywhere, 400, "every site to train round 2", every=0.1)
    deployment.restart_superlink()  # SIGKILL: SuperLink, SuperExec and the ServerApp die mid-round
    run.kill()
    before = json.loads((out / "results.json").read_text())
    results = deployment.run_study(study, out, resume=True, timeout=600)

    assert [r["round"] for r in before["rounds"]] == [1]
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["rounds"][0] == before["rounds"][0]  # round 1 kept, not trained again
    assert results["initial"] == before["initial"]
    assert results["rounds"][1]["participants"] == SITES
    for site in SITES:
        entries = ledger(site, results["study_id"])
        # the count once; round 1 once; round 2 twice: the lost attempt and the resumed one both spent privacy
        assert [(e.kind, e.round, e.attempt) for e in entries] == [
            ("count", 0, 1), ("train", 1, 1), ("train", 2, 1), ("train", 2, 2)
        ]  # fmt: skip
        spent = SiteAccountant(deployment.state_dir(site)).epsilon(entries[-1].delta)
        assert results["final"]["sites"][site]["epsilon"] == pytest.approx(spent, rel=1e-9)
        assert results["rounds"][0]["sites"][site]["epsilon"] == pytest.approx(entries[1].epsilon, rel=1e-9)


@pytest.mark.slow
def test_packages_are_validated_over_the_deployment_under_each_sites_policy(deployment, tmp_path):
    """`flwr run` with `validate-packages`: each site evaluates each package and charges its budget."""
    from common.models import build_model
    from common.package import write_package

    ensure_online(deployment)
    meta = {"model": "cnn28", "in_channels": 1, "classes": ["normal", "finding"], "task": "classification",
            "input": {"size": [28, 28]}, "study": {"id": "candidate-0", "name": "candidate"}}  # fmt: skip
    packages = [write_package(tmp_path / f"p{i}" / "model", build_model("cnn28", num_classes=2, seed=i), meta)
                for i in (1, 2)]  # fmt: skip
    study = write_study(tmp_path / "validate.yaml", rounds=1, timeout_s=180)
    out = tmp_path / "out"
    run = deployment.submit(study, out, packages=packages)
    run.proc.wait(timeout=600)
    assert run.proc.returncode == 0 and (out / "validation.json").is_file(), run.tail()
    doc = json.loads((out / "validation.json").read_text())
    assert doc["status"] == "completed" and doc["sites"] == SITES and len(doc["packages"]) == 2
    for entry in doc["packages"]:
        assert sorted(entry["sites"]) == SITES and not entry["failed"]
        assert all(
            m["release"] == "dp_histogram" for m in entry["sites"].values()
        )  # the sites' default policy
    assert not (out / "results.json").exists()  # nothing trained
    for site in SITES:
        lines = [
            e
            for e in SiteAccountant(deployment.state_dir(site)).ledger.entries()
            if e.study == doc["validation_id"]
        ]
        assert [(e.kind, e.round) for e in lines] == [("evaluation", 1), ("evaluation", 2)]
