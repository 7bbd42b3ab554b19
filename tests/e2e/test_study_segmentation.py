"""`fedward study` of a segmentation task: per-site and pooled Dice (and HD95) with bootstrap intervals
for the federated, local-only and centralized UNets, the paired gains of federating, the cross-site
matrix and the report, on the synthetic segmentation sites.

One small study (2 sites, 4 rounds: one federation through Flower's engine plus 3 trainings in
process, about 30 s on 2 cores) runs once for the module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from client.train import predict
from common.config import load_study
from common.data import load_site_data
from common.models import load_model
from common.simulated import simulated_sites
from tests.conftest import run_fedward
from tests.server.test_report import assert_not_blank

SITES = ["hospital-a", "hospital-b"]
STUDY = """
name: seg-study-test
seed: 0
rounds: 4
min_sites: 2
task: segmentation
data:
  source: synthetic
  num_sites: 2
  synthetic: {train_per_site: 96, test_per_site: 24, val_per_site: 0}
model: {name: unet}
train: {local_epochs: 2, batch_size: 8, lr: 0.002}
simulation: {client_cpus: 1}
study: {bootstrap_samples: 200, leave_one_out: false}
"""


@pytest.fixture(scope="module")
def seg_study(tmp_path_factory) -> tuple[Path, Path, dict, str]:
    tmp = tmp_path_factory.mktemp("seg-study")
    config = tmp / "study.yaml"
    config.write_text(STUDY)
    out = tmp / "out"
    proc = run_fedward(
        "study", str(config), "--out", str(out), "--mlflow", f"sqlite:///{tmp / 'mlflow.db'}", timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config, out, json.loads((out / "study.json").read_text()), proc.stdout


def _within(value: float, ci: list[float]) -> bool:
    return ci[0] - 1e-9 <= value <= ci[1] + 1e-9


@pytest.mark.slow
def test_every_model_has_dice_with_an_interval_at_every_site_and_pooled(seg_study):
    _, out, doc, stdout = seg_study
    assert doc["status"] == "completed" and doc["metric"] == "dice" and doc["sites"] == SITES
    comp = doc["comparison"]
    assert comp["metric"] == "dice" and comp["columns"] == ["local", "federated", "centralized"]
    for s in [*SITES, "pooled"]:
        for c in comp["columns"]:
            cell = comp["rows"][s][c]
            assert cell["dice"] is not None and _within(cell["dice"], cell["ci"]), (s, c, cell)
            assert cell["ci"][1] > cell["ci"][0]  # 24 test images: the interval has width
    fed = doc["models"]["federated"]["eval"]
    assert fed["pooled"]["dice"] > 0.4, fed  # it learnt: the comparison is not of zeros
    for s in [*SITES, "pooled"]:
        assert fed[s]["hd95"] is not None and _within(fed[s]["hd95"], fed[s]["ci"]["hd95"])
    # the federated model tested here in process == what the sites reported through Flower
    reported = json.loads((out / "federated" / "results.json").read_text())["final"]["sites"]
    for s in SITES:
        assert fed[s]["dice"] == pytest.approx(reported[s]["dice"], abs=1e-6)
        assert fed[s]["hd95"] == pytest.approx(reported[s]["hd95"], abs=1e-5)
    words = " ".join(stdout.split())  # the terminal table wraps its title
    assert "test Dice per site" in words and "AUC" not in words


@pytest.mark.slow
def test_dice_is_monai_dice_metric_on_each_models_own_predictions(seg_study):
    config, out, doc, _ = seg_study
    study = load_study(str(config))
    data = {site.site: load_site_data(site) for site in simulated_sites(study)}
    models = {"centralized": out / "models" / "centralized.pt"}
    models |= {f"local:{s}": out / "models" / f"local-{s}.pt" for s in SITES}
    for key, path in models.items():
        model, _ = load_model(path)
        pooled = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
        for s in SITES:
            pred = predict(model, data[s].test_x).argmax(axis=1)
            p, t = (one_hot(torch.as_tensor(a)[:, None], 2) for a in (pred, data[s].test_y.numpy()))
            metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
            metric(p, t)
            pooled(p, t)
            assert doc["models"][key]["eval"][s]["dice"] == pytest.approx(float(metric.aggregate()), abs=1e-6)
        # pooled: the mean over every image of both sites, as the federation pools its sites' sums
        assert doc["models"][key]["eval"]["pooled"]["dice"] == pytest.approx(
            float(pooled.aggregate()), abs=1e-6
        )


@pytest.mark.slow
def test_gains_are_paired_differences_of_dice_and_the_summary_follows_them(seg_study):
    _, _, doc, _ = seg_study
    comp = doc["comparison"]
    for s in [*SITES, "pooled"]:
        rows, gains = comp["rows"][s], comp["gains"][s]
        for name, other in (("federated_vs_local", "local"), ("federated_vs_centralized", "centralized")):
            g = gains[name]
            assert g["difference"] == pytest.approx(rows["federated"]["dice"] - rows[other]["dice"], abs=1e-5)
            assert _within(g["difference"], g["ci"]), (s, name, g)
    # the summary's verdict per site is the sign of the paired interval
    for s in SITES:
        g = comp["gains"][s]["federated_vs_local"]
        line = next(x for x in doc["summary"] if x.startswith(s))
        if g["ci"][0] > 0:
            assert "gains from federating: Dice" in line
        elif g["ci"][1] < 0:
            assert "does better alone: Dice" in line
        else:
            assert "no clear difference" in line


@pytest.mark.slow
def test_report_shows_dice_tables_and_plots_and_rebuilds(seg_study):
    _, out, doc, _ = seg_study
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["comparison.png", "cross_site.png", "dice_by_round.png"]  # no ROC for masks
    for p in pngs:
        assert_not_blank(out / p)
    html = (out / "report.html").read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # the plots' bytes can spell "ECE"
    assert "Test Dice per site [95% bootstrap CI]" in text and "Cross-site Dice [95% CI]" in text
    assert "HD95 (px)" in text and "ECE" not in text
    cs = doc["cross_site"]
    assert cs["metric"] == "dice" and np.array(cs["dice"], dtype=float).shape == (4, 3)
    (out / "report.html").unlink()
    proc = run_fedward("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.html").read_text() == html


@pytest.mark.slow
def test_the_study_is_in_mlflow_with_every_models_dice(seg_study):
    from mlflow.tracking import MlflowClient

    _, out, doc, _ = seg_study
    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("fedward").experiment_id)
    assert run.data.tags["fedward.kind"] == "study" and run.data.params["task"] == "segmentation"
    for key in ("federated", "centralized", "local:hospital-a"):
        got = run.data.metrics[f"{key.replace(':', '.')}/pooled/dice"]
        assert got == pytest.approx(doc["models"][key]["eval"]["pooled"]["dice"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "federated/rounds/dice/pooled")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "study.json",
        "report.html",
        "MODEL_CARD.md",
    }
