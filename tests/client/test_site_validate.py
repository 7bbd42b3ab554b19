"""`fedward site validate`: a hospital validates packages on its own images, in-house: the metrics are
those of the packages' own predictions, with intervals; nothing is charged; a package for other images
is refused naming what differs; `fedward compare` reads the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.site_validate import validate_here
from client.train import predict
from common.data import load_site_data
from common.metrics import site_summary
from common.models import build_model
from common.package import load_package, write_package
from common.schema import SiteConfig, SiteDataConfig, SyntheticConfig
from common.sitedata import SiteDataError
from server.cli import main as fedward
from tests.packages import META, synthetic_package


def _site(tmp_path) -> SiteConfig:
    data = SiteDataConfig(
        format="synthetic", synthetic=SyntheticConfig(train_per_site=80, test_per_site=60, val_per_site=20)
    )
    return SiteConfig(site="new-hospital", data=data, state_dir=str(tmp_path / "state"))


def test_a_hospital_validates_packages_on_all_its_images_and_nothing_is_charged(tmp_path):
    site = _site(tmp_path)
    good = synthetic_package(tmp_path / "good", images=300, epochs=6, lr=0.003)
    fresh = write_package(
        tmp_path / "fresh" / "model", build_model("cnn28", seed=3), {**META, "study": {"name": "fresh"}}
    )
    doc = validate_here(site, [good, fresh], tmp_path / "out")
    data = load_site_data(site)
    x = np.concatenate([data.train_x, data.test_x, data.val_x])
    y = np.concatenate([data.train_y, data.test_y, data.val_y])
    assert doc["local"] == {"site": "new-hospital", "split": "all", "images": 160}
    for entry, path in zip(doc["packages"], (good, fresh), strict=True):
        model, _ = load_package(path)
        direct = site_summary(y, predict(model, torch.from_numpy(x)))
        got = entry["sites"]["new-hospital"]
        assert got["auc"] == pytest.approx(direct["auc"], abs=1e-6) and got["n_test"] == 160
        assert got["auc_ci"][0] <= got["auc"] <= got["auc_ci"][1] and got["release"] == "local"
    trained = doc["packages"][0]["sites"]["new-hospital"]["auc"]
    assert trained > 0.9, (
        f"a package trained on the same synthetic finding should separate it (AUC {trained})"
    )
    assert not (tmp_path / "state").exists()  # no ledger, no cache: nothing was released
    assert json.loads((tmp_path / "out" / "validation.json").read_text())["packages"][1]["label"] == "fresh"
    # the federated tools read it: the report, and whether the trained package may replace the fresh one
    assert fedward(["report", str(tmp_path / "out")]) == 0
    assert (
        fedward(
            [
                "compare",
                str(tmp_path / "out"),
                str(tmp_path / "out"),
                "--old-package",
                "2",
                "--new-package",
                "1",
            ]
        )
        == 0
    )


def test_a_package_for_other_classes_is_refused_naming_the_package_and_the_classes(tmp_path):
    other = write_package(tmp_path / "other" / "model", build_model("cnn28", num_classes=3),
                          {**META, "classes": ["a", "b", "c"]})  # fmt: skip
    with pytest.raises(SiteDataError, match="classes") as err:
        validate_here(_site(tmp_path), [other], tmp_path / "out")
    assert str(other) in str(err.value) and not (tmp_path / "out").exists()
