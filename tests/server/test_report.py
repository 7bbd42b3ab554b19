"""Uncertainty (bootstrap intervals, calibration), the study's progress estimate, and `fedward report`
on a plain federated run (its page, its refusal of files of the wrong shape, the same rows as the
terminal table): fast tests, no training."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from common.metrics import site_summary
from common.uncertainty import (
    bootstrap_intervals,
    calibration,
    paired_difference,
    resample_counts,
    roc_points,
    weighted_binary_auc,
)
from server.cli import main as fedward
from server.progress import summary_table
from server.report import ReportError, build_report, load_run, plain_summary
from server.study.plan import Part
from server.study.progress import StudyProgress


def _scores(n: int, n_classes: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += signal
    logits = np.round(logits, 1)  # ties, as real scores have
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def assert_not_blank(path: Path) -> None:
    """A PNG that decodes, is not tiny, and is not one flat colour (more than 2% non-white pixels)."""
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape
    rgb = image[..., :3]
    assert rgb.std() > 0.05
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.02


# ----------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("n_classes", [2, 3])
def test_resampling_with_unit_weights_reproduces_the_reported_metrics(n_classes):
    labels, probs = _scores(300, n_classes, 1.0, seed=n_classes)
    reported = site_summary(labels, probs)  # MONAI AUC, confusion-based sensitivity / specificity
    same = paired_difference(labels, probs, probs, samples=200, seed=0)
    assert all(v["difference"] == 0.0 and v["ci"] == [0.0, 0.0] for v in same.values())
    classes = [1] if n_classes == 2 else range(n_classes)
    aucs = [weighted_binary_auc(probs[:, c], labels == c, np.ones((1, len(labels))))[0] for c in classes]
    assert np.mean(aucs) == pytest.approx(reported["auc"], abs=1e-12)


def test_bootstrap_is_stratified_seeded_and_narrows_with_more_data():
    labels, probs = _scores(200, 2, 1.2, seed=1)
    counts = resample_counts(labels, 50, np.random.default_rng(0))
    assert (counts[:, labels == 1].sum(axis=1) == (labels == 1).sum()).all()  # class counts kept
    assert (counts.sum(axis=1) == len(labels)).all()

    small = bootstrap_intervals(labels, probs, samples=1000, seed=3)
    assert small == bootstrap_intervals(labels, probs, samples=1000, seed=3)
    point = site_summary(labels, probs)
    for metric in ("auc", "sensitivity", "specificity"):
        lo, hi = small[metric]
        assert lo < point[metric] < hi
    big_labels, big_probs = _scores(3200, 2, 1.2, seed=1)
    big = bootstrap_intervals(big_labels, big_probs, samples=1000, seed=3)
    width = {k: small[k][1] - small[k][0] for k in small}
    assert all(big[k][1] - big[k][0] < 0.5 * width[k] for k in big)  # about 1/sqrt(16) as wide


def test_a_better_model_wins_on_paired_resamples_and_a_one_class_site_has_no_auc_interval():
    labels, strong = _scores(400, 2, 2.5, seed=4)
    rng = np.random.default_rng(5)
    weak = np.clip(strong + rng.normal(0, 0.35, strong.shape), 1e-6, None)
    weak /= weak.sum(axis=1, keepdims=True)
    diff = paired_difference(labels, strong, weak, samples=500, seed=0)["auc"]
    assert diff["difference"] > 0 and diff["ci"][0] > 0

    one_class = np.zeros(50, dtype=np.int64)
    ci = bootstrap_intervals(one_class, strong[:50], samples=200, seed=0)
    assert ci["auc"] is None and ci["sensitivity"] is None and ci["specificity"] is not None
    assert roc_points(one_class, strong[:50]) is None


def test_expected_calibration_error_separates_calibrated_from_overconfident():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0, 1, 20000)
    labels = (rng.uniform(0, 1, p1.size) < p1).astype(np.int64)  # calibrated by construction
    calibrated = np.stack([1 - p1, p1], axis=1)
    sharp = np.where(p1 > 0.5, 0.99, 0.01)
    overconfident = np.stack([1 - sharp, sharp], axis=1)
    good = calibration(labels, calibrated, bins=10)
    # calibrated by construction: only sampling noise (20000 draws in 10 bins) is left
    assert good["ece"] < 0.02, good["ece"]
    assert sum(b["n"] for b in good["bins"]) == len(labels)
    over = calibration(labels, overconfident, bins=10)["ece"]
    assert over > 0.2, f"scores pushed to 0.01/0.99 are off by ~0.25 on average, ECE {over}"


def test_roc_points_run_from_zero_to_one():
    labels, probs = _scores(300, 2, 1.0, seed=7)
    roc = roc_points(labels, probs)
    assert roc["fpr"][0] == 0 and roc["tpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)


# ----------------------------------------------------------------------------- progress estimate


def test_progress_names_part_round_and_site_and_estimates_time_left(tmp_path):
    from rich.console import Console

    parts = [
        Part("federated", "federated", 600.0, True, False, 2),
        Part("local", "local-only", 600.0, False, False, 2),
    ]
    console = Console(record=True, width=200)
    progress = StudyProgress(parts, tmp_path, console)
    progress.begin(parts[0])
    assert progress.eta_s() is None  # nothing measured yet
    record = {"round": 1, "sites": {"a": {"auc": 0.8}}, "pooled": {"auc": 0.8}}
    progress.round_done(record, round_s=3.0)  # 300 units in 3 s: 0.01 s per unit
    # left: 300 units of this run, 600 local units, no other federated run to start
    assert progress.eta_s() == pytest.approx(9.0)
    progress.round_done({**record, "round": 2}, round_s=3.0)
    time.sleep(0.01)
    progress.end(parts[0])
    progress.begin(parts[1])
    progress.trained(False, 300.0, 3.0)
    progress.site_done("a", "trained alone")
    state = json.loads((tmp_path / "progress.json").read_text())
    assert state["part"] == "local" and state["part_index"] == 2 and state["site"] == "a"
    assert state["eta_s"] == pytest.approx(3.0)
    assert state["done_fraction"] == pytest.approx(0.75)
    text = console.export_text()
    assert "[1/2" in text and "round 2/2" in text and "a: trained alone" in text and "left]" in text


# ----------------------------------------------------------------------------- report of a plain run


def _results(private: bool) -> dict:
    """A results.json as `fedward simulate` writes it (README contract), two rounds, three sites."""

    def metrics(auc: float, n: int = 150, eps: float | None = None) -> dict:
        m = {
            "n_test": n,
            "auc": auc,
            "accuracy": 0.8,
            "sensitivity": 0.7,
            "specificity": 0.9,
            "balanced_accuracy": 0.8,
        }
        if eps is not None:
            m.update({"epsilon": eps, "delta": 1e-5, "noise_multiplier": 1.1, "steps": 10, "refused": None})
        return m

    sites = ("hospital-a", "hospital-b", "hospital-c")
    rounds = [
        {
            "round": r,
            "finished_at": "2026-01-01T00:00:00+00:00",
            "sites": {
                s: metrics(0.6 + 0.1 * r + 0.02 * i, eps=(3.0 * r if private else None))
                for i, s in enumerate(sites)
            },
            "pooled": metrics(0.65 + 0.1 * r, n=450),
            "participants": list(sites),
            "train": {s: {"n_train": 300, "loss": 0.5, "train_s": 1.0} for s in sites},
            "refused": {},
            "failed": {},
        }
        for r in (1, 2)
    ]
    return {
        "study_id": "demo-1234",
        "study": {
            "name": "demo",
            "rounds": 2,
            "model": {"name": "cnn28"},
            "strategy": {"name": "fedavg"},
            "privacy": {"enabled": private, "target_epsilon": 8.0},
        },
        "status": "completed",
        "initial": {"sites": {s: metrics(0.5) for s in sites}, "pooled": metrics(0.5, n=450)},
        "rounds": rounds,
        "final": {"sites": rounds[-1]["sites"], "pooled": rounds[-1]["pooled"], "round": 2},
        "timing": {"total_s": 10.0, "round_s": [4.0, 4.0], "train_s": {}, "eval_s": {}},
    }


@pytest.mark.parametrize("private", [False, True])
def test_report_of_a_simulate_folder_with_only_results_json(tmp_path, private):
    (tmp_path / "results.json").write_text(json.dumps(_results(private)))
    report = build_report(tmp_path)

    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == (["auc_by_round.png", "epsilon_by_round.png"] if private else ["auc_by_round.png"])
    for name in pngs:
        assert_not_blank(tmp_path / name)
    page = report.read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert 'id="per-site-table"' in page
    table = page.split('id="per-site-table"')[1].split("</table>")[0]
    assert all(s in table for s in ("hospital-a", "hospital-b", "hospital-c", "pooled"))
    assert ("6.00" in table) == private  # final epsilon per site
    summary = plain_summary(load_run(tmp_path))
    assert "pooled test AUC 0.850" in summary[0] and "fedward study" in summary[-1]


def test_report_of_a_folder_without_a_run_says_what_to_give(tmp_path, capsys):
    assert fedward(["report", str(tmp_path)]) == 2
    assert "holds none of study.json, validation.json, results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        build_report(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "is not valid JSON"),
        (b"[1, 2, 3]", "the file is a list, not an object"),
        (b'{"study": {"name": "demo"}}', "'rounds' is missing"),
        (b'{"rounds": {"1": {}}}', "'rounds' is an object, not a list"),
    ],
    ids=["random-bytes", "a-list", "no-rounds", "rounds-not-a-list"],
)
def test_report_of_a_results_json_of_the_wrong_shape_names_the_file_and_the_key(
    tmp_path, capsys, content, message
):
    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(ReportError, match=message) as err:
        load_run(tmp_path)
    assert str(tmp_path / "results.json") in str(err.value)
    assert fedward(["report", str(tmp_path)]) == 2  # the command says so, without a traceback
    said = capsys.readouterr().err
    assert said.startswith("error: ") and "Traceback" not in said and message in said
    assert not (tmp_path / "report.html").exists()


def test_a_wrong_value_deep_inside_is_named_by_its_path(tmp_path):
    results = _results(private=True)
    results["rounds"][1]["sites"]["hospital-b"]["auc"] = "0.9"
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(
        ReportError, match=r"'rounds\[1\]\.sites\.hospital-b\.auc' is the string '0\.9', not a number"
    ):
        build_report(tmp_path)
    (tmp_path / "results.json").unlink()
    (tmp_path / "study.json").write_text(json.dumps({"kind": "fedward-study", "status": "running"}))
    with pytest.raises(ReportError, match="has not finished"):
        build_report(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps(results))
    with pytest.raises(ReportError, match="is not a `fedward study` study.json"):
        build_report(tmp_path)


def test_the_terminal_table_and_the_report_show_the_same_rows(tmp_path):
    from rich.console import Console

    results = _results(private=True)
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = build_report(tmp_path).read_text()
    body = page.split('id="per-site-table"')[1].split("<tbody>")[1].split("</tbody>")[0]
    on_page = [re.findall(r"<td>(?:<b>)?([^<]*)", row) for row in body.split("</tr>")[:-1]]
    console = Console(record=True, width=200)
    console.print(summary_table(results))
    lines = console.export_text().splitlines()
    in_terminal = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert [row[0] for row in in_terminal] == ["hospital-a", "hospital-b", "hospital-c", "pooled"]
    assert in_terminal[-1][1:3] == ["900", "450"] and in_terminal[0][-1] == "6.00"  # train, test, ε
    assert [[c.replace("–", "-") for c in row] for row in on_page] == in_terminal


# ----------------------------------------------------------------------------- the study section


def test_study_section_is_checked_and_chooses_the_runs(tmp_path):
    from common.config import ConfigError, load_study
    from common.data import load_site_data
    from common.simulated import simulated_sites
    from server.study.plan import plan, validate_comparison, variants
    from server.study.run import run_comparison

    base = "rounds: 3\ndata: {num_sites: 3, synthetic: {train_per_site: 40, test_per_site: 20}}\n"
    config = tmp_path / "study.yaml"
    config.write_text(base + "privacy: {enabled: true}\nstudy: {compare_privacy: true, centralized: false}\n")
    study = load_study(config)
    assert variants(study) == ["federated-dp", "federated"]  # as configured first, then the other way
    data = {s.site: load_site_data(s) for s in simulated_sites(study)}
    parts = plan(study, data)
    assert [p.key for p in parts] == [
        "federated-dp",
        "federated",
        "local-dp",
        "local",
        "leave-one-out:hospital-a",
        "leave-one-out:hospital-b",
        "leave-one-out:hospital-c",
    ]
    assert all(p.private for p in parts if p.key.startswith("leave-one-out"))  # as the study is
    assert parts[-1].units == 3 * 1 * 80  # rounds x local epochs x the other sites' images

    config.write_text(base + "study: {bootstrap_samples: 50}\n")
    with pytest.raises(ConfigError, match="'study.bootstrap_samples' is 50"):
        validate_comparison(load_study(config))
    config.write_text(base + "study: {bootstrap: 50}\n")
    with pytest.raises(ConfigError, match="Did you mean 'bootstrap_samples'"):
        load_study(config)

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "study.json").write_text("{}")
    config.write_text(base)
    with pytest.raises(ConfigError, match="already holds a `fedward study`"):
        run_comparison(load_study(config), tmp_path / "out")
