"""The study says what the model is: a coordinator that holds no site config and no data builds the
right model from the study alone, and a site whose data differs refuses before it trains, naming what
differs; the package records what the sites said about how they prepare their images."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from flwr.app import Message, MessageType

from client.app import handle_evaluate, handle_train
from client.ledger import SiteAccountant
from client.site import SiteRuntime
from common.config import ConfigError, load_study
from common.model_spec import model_spec
from common.package import load_package
from common.schema import SiteConfig, SiteDataConfig, SitePartition, SitePolicyConfig, SyntheticConfig
from server.coordinator import run_study
from server.run_folder import RESULTS_FILE
from tests.server.test_round_loop import LocalGrid, _task_identity  # noqa: F401 - the fixture


def _deployment_study(tmp_path, **extra) -> object:
    """A deployment's study: its sites are hospitals whose configs and data the coordinator never sees."""
    doc = {"name": "deployed", "rounds": 2, "min_sites": 1, "round_timeout_s": 5,
           "data": {"source": "sites", "site_configs": ["/hospital-a/site.yaml", "/hospital-b/site.yaml"]},
           "model": {"name": "cnn28-small"}, "train": {"batch_size": 16}, **extra}  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc))
    return load_study(tmp_path / "study.yaml")


def _site(name: str, index: int, tmp_path, classes: list[str] | None = None):
    data = SiteDataConfig(format="synthetic", partition=SitePartition(index=index, num_sites=2),
                          synthetic=SyntheticConfig(train_per_site=32, test_per_site=16, val_per_site=16))  # fmt: skip
    site = SiteConfig(
        site=name, data=data, privacy=SitePolicyConfig(required=False), state_dir=str(tmp_path / name)
    )
    runtime = SiteRuntime.load(site)
    if classes:  # a hospital whose label sheet names other classes
        runtime.data = dataclasses.replace(runtime.data, classes=classes)

    def answer(msg: Message) -> Message:
        handle = handle_train if msg.metadata.message_type == MessageType.TRAIN else handle_evaluate
        return handle(msg, runtime)

    return answer


def test_a_study_over_hospitals_must_name_its_classes(tmp_path):
    with pytest.raises(ConfigError, match=r"names no classes \('classes: \[...\]'"):
        _deployment_study(tmp_path)


def test_a_coordinator_without_site_configs_or_data_builds_the_model_and_a_differing_site_refuses(tmp_path):
    study = _deployment_study(
        tmp_path, classes=["normal", "finding"], input={"channels": 1, "size": [28, 28]}
    )
    spec = model_spec(study)  # the site config paths do not exist: nothing of theirs is read
    assert (spec.classes, spec.in_channels, spec.size) == (("normal", "finding"), 1, (28, 28))
    grid = LocalGrid(
        {1: _site("hospital-a", 0, tmp_path), 2: _site("hospital-b", 1, tmp_path, ["benign", "malignant"])}
    )

    run_study(grid, study, tmp_path / "run", spec=spec, n_sites=2)

    results = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    refusal = results["rounds"][0]["refused"]["hospital-b"]
    assert "classes ['normal', 'finding'] differ from this site's ['benign', 'malignant']" in refusal
    assert results["rounds"][-1]["participants"] == ["hospital-a"]
    assert SiteAccountant(str(tmp_path / "hospital-b")).ledger.entries() == []  # it trained nothing
    model, meta = load_package(tmp_path / "run")
    assert meta["classes"] == ["normal", "finding"] and meta["in_channels"] == 1
    assert set(meta["input"]["sites"]) == {"hospital-a"}  # how the site that trained prepares its images
    assert meta["input"]["preprocess"] == {"size": [28, 28], "spatial": "resize", "channels": 1}


def test_a_site_refuses_a_model_of_other_channels_or_size(tmp_path):
    for extra, words in (({"channels": 3}, "takes 3 channel(s); this site's images have 1"),
                         ({"size": [64, 64]}, "takes [64, 64] pixels; this site's images are [28, 28]")):  # fmt: skip
        study = _deployment_study(tmp_path, classes=["normal", "finding"], input=extra)
        grid = LocalGrid({1: _site("hospital-a", 0, tmp_path)})
        out = tmp_path / f"run-{next(iter(extra))}"
        run_study(grid, study, out, spec=model_spec(study), n_sites=1)
        results = json.loads((out / RESULTS_FILE).read_text())
        assert (
            results["status"] == "stopped" and words in results["stopped_rounds"][0]["refused"]["hospital-a"]
        )
