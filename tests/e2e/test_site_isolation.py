"""Code the coordinator ships cannot get around the site: a real deployment on loopback (TLS,
SuperNode authentication, each site's own service, SuperNode and ClientApp runner as users of their
own), running an app changed to read the site's files, its key and its ledger, to rewrite the ledger
and to train without privacy. Every attempt is denied by the OS or refused by the site service, the
ledger holds only what the honest path wrote, and the honest app trains. Run as root."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from client.ledger import TRAINING_KINDS, SiteAccountant
from server.deploy import LocalDeployment
from tests.common.test_sources import write_dicom_site
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("every_core")  # tests/conftest.py

ATTACK = '''"""A ClientApp a curious coordinator ships: it tries everything, then forwards as the honest one does."""
import json, os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.forwarder import SOCKET_KEY, ask, forward

TARGETS = json.loads({targets!r})
app = ClientApp()


def attempt(action) -> str:
    try:
        action()
        return "done"
    except OSError as err:
        return type(err).__name__


def attack(context: Context, msg: Message) -> dict:
    site = context.node_config[SOCKET_KEY].split("/sites/")[1].split("/")[0]
    paths = TARGETS[site]
    found = {{
        "read site config": attempt(lambda: Path(paths["config"]).read_text()),
        "list state folder": attempt(lambda: os.listdir(paths["state"])),
        "read ledger": attempt(lambda: Path(paths["ledger"]).read_text()),
        "rewrite ledger": attempt(lambda: Path(paths["ledger"]).write_text("")),
        "read SuperNode key": attempt(lambda: Path(paths["key"]).read_text()),
    }}
    if paths.get("data"):
        found["read images"] = attempt(lambda: [p.read_bytes() for p in Path(paths["data"]).rglob("*.dcm")])
    arrays = {{k: a.numpy() for k, a in msg.content["arrays"].items()}}
    config = {{str(k): v for k, v in msg.content["config"].items()}}
    for name, asked in (("train without privacy", {{"dp-enabled": False}}),
                        ("train with no noise", {{"dp-noise-multiplier": 0.01}})):
        header, weights = ask(context.node_config[SOCKET_KEY], {{"op": "train", "config": config | asked}}, arrays)
        found[name] = "refused" if header.get("refused") else ("error" if header.get("error") else "trained")
    Path(TARGETS["reports"], site + ".json").write_text(json.dumps(found))
    return found


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack(context, msg)
    return forward(msg, str(context.node_config[SOCKET_KEY]), "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return forward(msg, str(context.node_config[SOCKET_KEY]), "evaluate")
'''


@pytest.fixture(scope="module")
def folder():
    made = Path(tempfile.mkdtemp(prefix="fedward-isolation-", dir="/tmp"))
    made.chmod(0o755)  # the deployment's users must be able to enter it; what is inside is not theirs
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(folder):
    """hospital-a trains on a DICOM export (its own, private folder), hospital-b on synthetic data."""
    templates = folder / "templates"
    templates.mkdir()
    site_a = yaml.safe_load(
        write_dicom_site(
            folder / "export-a", name="hospital-a", patients=12, size=28, bad_files=False
        ).read_text()
    )
    site_a["data"]["root"] = str(folder / "export-a" / "export")
    site_a["data"]["labels"] = str(folder / "export-a" / "labels.csv")
    (folder / "export-a").chmod(0o700)  # the hospital's images: only the site service reads them
    (templates / "hospital-a.yaml").write_text(yaml.safe_dump(site_a))
    site_b = {"site": "hospital-b", "data": {"format": "synthetic", "partition": {"index": 1, "num_sites": 2},
              "classes": ["normal", "pneumonia"],  # named as hospital-a's sheet names them
              "synthetic": {"train_per_site": 48, "test_per_site": 16}}}  # fmt: skip
    (templates / "hospital-b.yaml").write_text(yaml.safe_dump(site_b))
    with LocalDeployment(folder / "deploy", site_templates=templates) as dep:
        dep.start_all()
        yield dep


def _study(folder: Path) -> Path:
    study = {
        "name": "isolation",
        "classes": ["normal", "pneumonia"],  # the sites' classes: each checks them against its data
        "rounds": 1,
        "min_sites": 2,
        "round_timeout_s": 180,
        "data": {"source": "synthetic", "num_sites": 2},
        "model": {"name": "cnn28-small"},
        "train": {"local_epochs": 1, "batch_size": 16},
        "privacy": {"enabled": True, "noise_multiplier": 1.0},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _attacking_app(folder: Path, dep: LocalDeployment) -> Path:
    """This project, with client/app.py replaced by the attack."""
    app = folder / "attacking-app"
    shutil.copytree(
        ROOT,
        app,
        ignore=shutil.ignore_patterns(".git", "tests", "bench", "runs", "__pycache__", "*.egg-info"),
    )
    reports = folder / "reports"
    reports.mkdir()
    reports.chmod(0o777)  # where the attack says what it got (the app's user may write here)
    targets = {"reports": str(reports)}
    for site in dep.sites:
        paths = dep.paths(site)
        targets[site] = {
            "config": str(paths.config),
            "state": str(paths.state),
            "ledger": str(paths.state / "privacy-ledger.jsonl"),
            "key": str(dep.credentials.site_keys[site]),
            "data": str(folder / "export-a" / "export") if site == "hospital-a" else "",
        }
    (app / "client" / "app.py").write_text(ATTACK.format(targets=json.dumps(targets)))
    return app


@pytest.mark.slow
def test_an_app_the_coordinator_changed_gets_nothing_and_the_honest_app_trains(deployment, folder):
    study = _study(folder)
    app = _attacking_app(folder, deployment)

    attacked = deployment.run_study(study, folder / "attacked", app=app, timeout=600)

    assert attacked["status"] == "completed"  # the attack forwarded honestly in the end
    for site in deployment.sites:
        found = json.loads((folder / "reports" / f"{site}.json").read_text())
        denied = {k: v for k, v in found.items() if not k.startswith("train")}
        assert set(denied.values()) == {"PermissionError"}, found
        assert found["train without privacy"] == found["train with no noise"] == "refused", found
        entries = SiteAccountant(deployment.state_dir(site)).ledger.entries()
        # the honest round only (its evaluations aside), nothing rewritten
        assert [e.kind for e in entries if e.kind in TRAINING_KINDS] == ["count", "train"]
    assert "read images" in json.loads((folder / "reports" / "hospital-a.json").read_text())

    honest = deployment.run_study(study, folder / "honest", timeout=600)

    assert honest["status"] == "completed" and honest["rounds"][0]["participants"] == deployment.sites
