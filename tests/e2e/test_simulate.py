"""`fedward simulate` end to end with Flower's simulation engine: contract, learning, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_fedward

METRICS = {"n_test", "auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy"}


def _check_metrics(block: dict, sites: set[str]) -> None:
    assert set(block["sites"]) == sites
    for m in [*block["sites"].values(), block["pooled"]]:
        assert METRICS <= set(m)
        assert m["n_test"] > 0
        for key in METRICS - {"n_test"}:
            assert m[key] is None or 0.0 <= m[key] <= 1.0


@pytest.mark.slow
def test_demo_two_sites_two_rounds_follows_the_results_contract(tmp_path):
    out = tmp_path / "demo"
    proc = run_fedward("simulate", "configs/demo.yaml", "--out", str(out), "--rounds", "2", "--sites", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pooled" in proc.stdout and "hospital-b" in proc.stdout  # the summary table

    results = json.loads((out / "results.json").read_text())
    sites = {"hospital-a", "hospital-b"}
    assert results["status"] == "completed"
    assert results["study"]["rounds"] == 2 and results["study"]["data"]["num_sites"] == 2
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for block in (results["initial"], results["final"], *results["rounds"]):
        _check_metrics(block, sites)
    assert results["rounds"][-1]["participants"] == sorted(sites)
    pooled_n = results["final"]["pooled"]["n_test"]
    assert pooled_n == sum(m["n_test"] for m in results["final"]["sites"].values()) == 300
    assert results["final"]["pooled"]["auc"] > results["initial"]["pooled"]["auc"]
    # the pooled AUC split by its pairs, from the sites' exact releases: the parts recompose it
    parts = results["final"]["pooled"]["auc_parts"]
    share = parts["across_share"]
    recomposed = parts["within_sites"] * (1 - share) + parts["across_sites"] * share
    assert recomposed == pytest.approx(results["final"]["pooled"]["auc"], abs=1e-4)

    timing = results["timing"]
    assert timing["total_s"] > 0 and len(timing["round_s"]) == 2
    assert set(timing["train_s"]) == sites and all(len(v) == 2 for v in timing["train_s"].values())

    from common.models import load_model

    model, meta = load_model(out / "final_model.pt")
    assert meta["model"] == "cnn28" and meta["round"] == 2 and meta["study"]["name"] == "demo"
    assert len(list((out / "checkpoints").glob("round-*.pt"))) == 2
    assert "round 2" in (out / "fedward.log").read_text()

    # the operating point: chosen on the sites' validation releases, reported on their test data
    op = results["operating_point"]
    assert op["chosen_on"] == "the sites' validation releases" and 0 < op["threshold"] < 1
    assert set(op["validation"]["sites"]) == sites and set(op["test"]) == sites
    from common.package import load_package

    packaged, package_meta = load_package(out)  # the model package, safetensors and JSON
    assert package_meta["operating_point"] == op and set(package_meta["performance"]["sites"]) == sites
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert f"Threshold {op['threshold']:.3f}" in card and all(s in card for s in sites)
    for m in results["final"]["sites"].values():  # an interval around each site's AUC, and its calibration
        assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1] and 0 <= m["ece"] <= 1
    assert "auc_ci" in card and "ece" in card
    for a, b in zip(packaged.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_pneumoniamnist_three_sites_label_skew_reaches_auc_090(tmp_path, medmnist_dir):
    out = tmp_path / "pneumonia"
    proc = run_fedward(
        "simulate",
        "configs/pneumoniamnist.yaml",
        "--out",
        str(out),
        "--rounds",
        "2",  # pooled AUC 0.923 after round 1, 0.934 after 2, 0.935 after 3
        "--data-dir",
        str(medmnist_dir),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["pooled"]["n_test"] == 624  # the whole official test split
    assert len(results["final"]["sites"]) == 3
    auc = results["final"]["pooled"]["auc"]
    assert auc >= 0.90, (
        f"pooled AUC {auc}: 2 rounds of this study should land near the published centralized "
        "ResNet-18 figure (0.944, MedMNIST v2); 0.90 is a floor that says it learned, with room for "
        "the noise of a short run"
    )
    from common.package import load_package

    _, package_meta = load_package(out)  # a chest X-ray model, and its package says so
    assert package_meta["input"]["modalities"] == ["CR", "DX"]
    assert "For CR, DX images" in (out / "model" / "MODEL_CARD.md").read_text()


def _recorded_rounds(out) -> list:
    """The rounds results.json records so far (written atomically); none before it exists."""
    try:
        return json.loads((out / "results.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


@pytest.mark.slow
def test_resume_after_a_killed_run_finishes_without_repeating_rounds(tmp_path):
    out = tmp_path / "resume"
    config = tmp_path / "fedadam.yaml"  # FedAdam: its server-side moments must survive the restart
    config.write_text(
        "name: resume\nrounds: 3\ndata: {num_sites: 2}\nstrategy: {name: fedadam, server_lr: 0.01}\n"
    )
    args = ["simulate", str(config), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = out / "checkpoints" / "round-0001.pt"
    deadline = time.time() + 300
    # round 1 is finished once results.json records it too (written just after the checkpoint; under
    # load a kill between the two left the checkpoint alone, which --resume takes, but not this test)
    while not _recorded_rounds(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, Ray's workers included
    proc.wait()
    assert first.exists(), "the run never finished round 1"
    before = json.loads((out / "results.json").read_text())
    done_before = [r["round"] for r in before["rounds"]]
    assert before["status"] == "running" and 1 <= len(done_before) < 3

    resumed = run_fedward(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = json.loads((out / "results.json").read_text())
    assert after["status"] == "completed"
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3]
    # finished rounds are kept as they were, not trained again
    assert after["rounds"][: len(done_before)] == before["rounds"]
    assert after["initial"] == before["initial"]
    log = (out / "fedward.log").read_text()
    assert f"resuming after round {done_before[-1]}" in log
    assert len(after["timing"]["round_s"]) == 3
    import torch

    checkpoint = torch.load(out / "checkpoints" / "round-0003.pt", weights_only=False)
    assert set(checkpoint["strategy_state"]) == {"m_t", "v_t"}


def test_bad_config_is_reported_before_any_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: cnn28\n  depth: 3\n")
    proc = run_fedward("simulate", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unknown key 'model.depth'" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "rounds", "metric", "floor"),
    [
        # the suite's time: 2 of the 3-D demo's 3 hospitals, 3 of its 5 rounds: pooled AUC 0.923, 0.989,
        # 1.000 (49 s alone; all three sites take 84 s and reach 0.850)
        ("configs/demo-3d.yaml", ["--rounds", "3", "--sites", "2"], "auc", 0.9),
        ("configs/demo-seg.yaml", [], "dice", 0.6),
    ],
    ids=["demo-3d", "demo-seg"],
)
def test_the_volume_and_segmentation_demos_learn(tmp_path, config, rounds, metric, floor):
    """The 3-D demo (cnn3d on synthetic volumes) and the segmentation demo (a UNet, Dice + CE) run
    through Flower's simulation engine and learn: the pooled metric rises over the rounds."""
    out = tmp_path / "run"
    proc = run_fedward("simulate", config, "--out", str(out), *rounds)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    series = [r["pooled"][metric] for r in results["rounds"]]
    assert series[-1] >= floor and series[-1] > results["initial"]["pooled"][metric], series
    sites = results["final"]["sites"]
    assert results["final"]["pooled"]["n_test"] == sum(m["n_test"] for m in sites.values())
    if metric == "dice":  # pooled from the sites' sums: a mean over every site's counted images
        values = [m[metric] for m in sites.values()]
        assert min(values) - 1e-9 <= results["final"]["pooled"][metric] <= max(values) + 1e-9
