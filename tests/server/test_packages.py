"""A model package checked against the study it is to start or be validated in (server.packages)."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, load_study
from common.models import build_model
from common.package import write_package
from server.packages import study_package
from server.simulate import preflight


def _study(tmp_path, model: str):
    config = tmp_path / "study.yaml"
    config.write_text(
        f"name: s\nrounds: 1\ndata: {{num_sites: 2, synthetic: {{train_per_site: 20, test_per_site: 10}}}}\n{model}\n"
    )
    return load_study(config)


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        ({"classes": ["normal", "finding", "other"]}, "its classes are ['normal', 'finding', 'other']"),
        ({"task": "segmentation", "classes": ["normal", "finding"]}, "its task is segmentation"),
        ({"classes": ["normal", "finding"], "model": "cnn28-small"}, "it is a cnn28-small"),
    ],
)
def test_a_package_for_another_model_is_refused_before_anything_runs_naming_what_differs(
    tmp_path, meta, named
):
    name = meta.get("model", "cnn28")
    model = build_model(name, in_channels=1, num_classes=len(meta["classes"]))
    package = write_package(
        tmp_path / "pkg", model, {"model": name, "in_channels": 1, "input": {"size": [28, 28]}, **meta}
    )
    study = _study(tmp_path, f"model: {{init_from: {package}}}")
    with pytest.raises(ConfigError, match="model.init_from") as err:
        preflight(study, tmp_path / "out")
    assert named in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_package_of_the_same_model_loads_with_its_identity(tmp_path):
    model = build_model("cnn28", in_channels=1, num_classes=2)
    package = write_package(tmp_path / "pkg", model, {"model": "cnn28", "in_channels": 1, "classes": ["normal", "finding"],
                                                    "input": {"size": [28, 28]}, "study": {"id": "s-1", "name": "s"}})  # fmt: skip
    loaded = study_package(package, _study(tmp_path, ""))
    assert loaded.identity["study_id"] == "s-1" and loaded.lineage[0] == loaded.identity
    a, b = model.state_dict(), loaded.model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_validating_a_package_of_another_task_fails_before_any_site_loads_its_data(tmp_path):
    from server.simulate import validate_simulated

    seg = write_package(tmp_path / "seg", build_model("unet", num_classes=2), {"model": "unet", "in_channels": 1,
                        "classes": ["background", "lesion"], "task": "segmentation", "input": {"size": [28, 28]}})  # fmt: skip
    with pytest.raises(ConfigError, match="package .* its task is segmentation"):
        validate_simulated(_study(tmp_path, ""), [str(seg)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_pretrained_package_of_other_classes_starts_the_same_network_and_no_other(tmp_path):
    from server.packages import initial_model

    source = build_model("cnn28", in_channels=1, num_classes=2, seed=5)
    package = write_package(tmp_path / "pre", source, {"model": "cnn28", "in_channels": 1, "classes": ["cat", "dog"],
                                                       "input": {"size": [28, 28]}})  # fmt: skip
    study = _study(tmp_path, f"model: {{pretrained: {package}}}")
    model = initial_model(study, in_channels=1, num_classes=2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True)
    )
    other = write_package(tmp_path / "other", build_model("cnn28-small", num_classes=2), {"model": "cnn28-small",
                          "in_channels": 1, "classes": ["cat", "dog"], "input": {"size": [28, 28]}})  # fmt: skip
    with pytest.raises(ConfigError, match="pretrain the same network"):
        preflight(_study(tmp_path, f"model: {{pretrained: {other}}}"), tmp_path / "out")
