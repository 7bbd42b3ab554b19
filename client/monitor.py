"""`fedward site monitor SITE_CONFIG --package PACKAGE`: has this site's data drifted from what the
package was trained on here? Runs at the site; nothing leaves it.

The reference is what the site kept when it trained in the package's study (client.profile: its
training images' intensities and acquisition facts, class counts, a sample of its test images), or,
with `--reference OTHER_SITE_CONFIG`, an export named explicitly. The current data is the site
config's own export, or `--data EXPORT_SITE_CONFIG` (a new export), optionally only the images
acquired in the last `--days N` days. Compared, feature by feature:

  acquisition   manufacturer, model, photometric interpretation, modality (categorical: chi-square
                test); kVp and pixel spacing (numeric: Kolmogorov-Smirnov test)
  intensity     each image's mean, standard deviation, 5th/50th/95th percentiles (Kolmogorov-Smirnov)
  labels        the share of each class (chi-square)
  predictions   the package's predicted probability of the positive class (binary), predicted class
                (more classes) or predicted foreground share (segmentation), on the reference's test
                sample against the current images (Kolmogorov-Smirnov or chi-square)
  performance   the package's AUC (Dice) on the current images, 95% bootstrap interval, against its
                release at this site in the study (package.json's performance)

Each distribution gets its population stability index (PSI; numeric features on 10 bins at the
reference's deciles) and a two-sample test (scipy). A feature drifts when PSI >= 0.25 and p < 0.01,
is to watch when PSI >= 0.1 and p < 0.01; performance drifts when the current interval lies wholly
below the reference's. Metadata the current export lacks (a stripped export) is said so, not
guessed. `monitor()` returns the document `server.report.monitor` writes as monitor.json and a report.
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from scipy.stats import chi2_contingency, ks_2samp

from client.profile import INTENSITY_FEATURES, intensity_features, load_profile, profile_of
from client.train import device, predict
from common.config import load_site
from common.data import load_site_data
from common.evaluation_blocks import classification_block, segmentation_block
from common.package import load_package, package_identity
from common.schema import SiteConfig
from common.seg_metrics import per_image_scores
from common.sitedata import SiteData, SiteDataError

PSI_DRIFT, PSI_WATCH, P_DRIFT = 0.25, 0.10, 0.01
CATEGORICAL = ("manufacturer", "model", "photometric", "modality")
NUMERIC = ("kvp", "pixel_spacing")
FLOOR = 1e-4  # a bin's smallest share in the PSI (an empty bin would make it infinite)
MONITOR_KIND = "fedward-monitor"


class MonitorError(SiteDataError):
    """The monitoring cannot run as asked: the message names the site, file or option and what to do."""


def psi(ref: np.ndarray, cur: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins."""
    r = np.maximum(ref / max(ref.sum(), 1), FLOOR)
    c = np.maximum(cur / max(cur.sum(), 1), FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def _status(index: float, p: float) -> str:
    if p < P_DRIFT and index >= PSI_DRIFT:
        return "drift"
    return "watch" if p < P_DRIFT and index >= PSI_WATCH else "stable"


def numeric_feature(name: str, group: str, ref: np.ndarray, cur: np.ndarray) -> dict:
    """PSI on the reference's deciles (on the values seen, when the reference is one value) and the
    Kolmogorov-Smirnov test; the histograms the report plots."""
    ref, cur = np.asarray(ref, dtype=np.float64), np.asarray(cur, dtype=np.float64)
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, 11)))[1:-1]
    if (
        len(inner) == 0
    ):  # the reference (nearly) one value, as a scanner's pixel spacing: a bin per value seen
        seen = np.unique(np.concatenate([ref, cur]))[:11]
        inner = (seen[1:] + seen[:-1]) / 2
    counts = [
        np.bincount(np.searchsorted(inner, v, side="right"), minlength=len(inner) + 1) for v in (ref, cur)
    ]
    index, p = psi(*counts), float(ks_2samp(ref, cur).pvalue)
    lo, hi = float(min(ref.min(), cur.min())), float(max(ref.max(), cur.max()))
    plot_edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
    return {
        "feature": name, "group": group, "kind": "numeric", "psi": round(index, 4),
        "test": "Kolmogorov-Smirnov", "p": p, "status": _status(index, p),
        "reference": {"n": len(ref), "median": float(np.median(ref))},
        "current": {"n": len(cur), "median": float(np.median(cur))},
        "histogram": {"edges": plot_edges.tolist(), "reference": np.histogram(ref, plot_edges)[0].tolist(),
                      "current": np.histogram(cur, plot_edges)[0].tolist()},
    }  # fmt: skip


def categorical_feature(name: str, group: str, ref: list[str], cur: list[str]) -> dict:
    """PSI over the categories of both and the chi-square test of the two count vectors."""
    cats = sorted({*ref, *cur})
    counts = np.array([[ref.count(c) for c in cats], [cur.count(c) for c in cats]], dtype=np.float64)
    index = psi(counts[0], counts[1])
    p = 1.0 if len(cats) < 2 else float(chi2_contingency(counts + 0.5)[1])  # + 0.5: no empty cell
    return {
        "feature": name, "group": group, "kind": "categorical", "psi": round(index, 4),
        "test": "chi-square", "p": p, "status": _status(index, p),
        "reference": {"n": len(ref), "counts": dict(zip(cats, counts[0].astype(int).tolist(), strict=True))},
        "current": {"n": len(cur), "counts": dict(zip(cats, counts[1].astype(int).tolist(), strict=True))},
    }  # fmt: skip


def _acquisition_features(ref: list[dict], cur: list[dict], notes: list[str]) -> list[dict]:
    out = []
    for fact in (*CATEGORICAL, *NUMERIC):
        have_ref = [a[fact] for a in ref if fact in a]
        have_cur = [a[fact] for a in cur if fact in a]
        if len(have_ref) < max(1, len(ref) // 2):
            continue  # the reference did not have it: nothing to compare with
        if len(have_cur) < len(cur):
            notes.append(
                f"acquisition metadata '{fact}' is missing in {len(cur) - len(have_cur)} of {len(cur)} current "
                "image(s) (an export that strips DICOM headers?); compared on the images that have it"
                if have_cur
                else f"acquisition metadata '{fact}' is missing in every current image: not compared"
            )
            if not have_cur:
                continue
        if fact in NUMERIC:
            out.append(
                numeric_feature(fact, "acquisition", np.array(have_ref, float), np.array(have_cur, float))
            )
        else:
            out.append(
                categorical_feature(
                    fact, "acquisition", [str(v) for v in have_ref], [str(v) for v in have_cur]
                )
            )
    return out


def _outputs(model: torch.nn.Module, x: torch.Tensor, task: str) -> np.ndarray:
    """What the prediction distribution compares: P(class 1), the predicted class, or the foreground share."""
    probs = predict(model.to(device()), x, batch_size=16 if task == "segmentation" else 512)
    if task == "segmentation":
        return (probs.argmax(axis=1) > 0).reshape(len(x), -1).mean(axis=1)
    return probs[:, 1] if probs.shape[1] == 2 else probs.argmax(axis=1)


def _performance(model, x, y, task: str, classes: int, reference: dict | None) -> dict:
    labels = y.numpy().astype(np.int64)
    if task == "segmentation":
        pred = predict(model, x, batch_size=16).argmax(axis=1)
        block = segmentation_block(
            np.stack(per_image_scores(labels, pred, classes), axis=1), samples=1000, seed=0
        )
        metric = "dice"
    else:
        block = classification_block(labels, predict(model, x), samples=1000, seed=0, bins=10, roc=False)
        metric = "auc"
    current = {"value": block.get(metric), "ci": block["ci"].get(metric)}
    ref = {"value": (reference or {}).get(metric), "ci": (reference or {}).get(f"{metric}_ci")}
    dropped = bool(current["ci"] and ref["ci"] and current["ci"][1] < ref["ci"][0])
    return {"feature": f"{metric} (performance)", "group": "performance", "kind": "performance", "metric": metric,
            "current": current, "reference": ref, "status": "drift" if dropped else "stable"}  # fmt: skip


def _current(site: SiteConfig, data_config: str | None) -> tuple[SiteData, str]:
    if not data_config:
        return load_site_data(site), site.source_path or site.site
    export = load_site(data_config)
    config = dataclasses.replace(site, data=export.data, source_path=export.source_path)
    return load_site_data(config), data_config


def _all_images(data: SiteData) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    splits = [("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)]
    if data.val_x is not None:
        splits.append(("val", data.val_x, data.val_y))
    x = torch.cat([x for _, x, _ in splits])
    if data.acquisition is None:  # arrays (synthetic, MedMNIST): no file, no metadata
        return x, torch.cat([y for _, _, y in splits]), [{} for _ in range(len(x))]
    facts = [a for name, _, _ in splits for a in data.acquisition.get(name, [])]
    return x, torch.cat([y for _, _, y in splits]), facts


def _recent(x, y, facts: list[dict], days: int, today: date, where: str):
    """Only the images acquired in the last `days` days (their acquisition date)."""
    dated = [
        datetime.strptime(str(a.get("date", "")), "%Y%m%d").date() if a.get("date") else None for a in facts
    ]
    if len(dated) < len(x) or any(d is None for d in dated):
        missing = len(x) - sum(d is not None for d in dated)
        raise MonitorError(f"--days {days}: {missing} of {len(x)} images of {where} have no acquisition date "
                           "(AcquisitionDate, ContentDate or StudyDate); monitor the whole export without --days")  # fmt: skip
    keep = [i for i, d in enumerate(dated) if d is not None and d >= today - timedelta(days=days)]
    if not keep:
        raise MonitorError(
            f"--days {days}: no image of {where} was acquired in the last {days} days (up to {today})"
        )
    idx = torch.tensor(keep)
    return x[idx], y[idx], [facts[i] for i in keep]


def _reference(site: SiteConfig, study_id: str, reference_config: str | None) -> dict:
    if reference_config:  # an export named explicitly: its training split, and a sample of its test split
        export = load_site(reference_config)
        data = load_site_data(dataclasses.replace(site, data=export.data, source_path=export.source_path))
        train = profile_of(data.train_x, data.train_y, (data.acquisition or {}).get("train"), data.classes)
        return {"intensity": train["intensity"], "acquisition": train["acquisition"],
                "class_counts": train["class_counts"], "sample_x": data.test_x, "sample_y": data.test_y,
                "path": reference_config, "meta": {"n_train": train["n"]}}  # fmt: skip
    profile = load_profile(site.state_dir, study_id) if site.state_dir else None
    if profile is None:
        raise MonitorError(
            f"site '{site.site}' kept no record of what study {study_id} trained on here (no profile in "
            f"{site.state_dir or 'its state_dir'}/profiles): it did not train in that study, or its state_dir "
            "moved. Give --reference SITE_CONFIG of the export the package was trained on."
        )
    return profile


def monitor(site: SiteConfig, package: str | Path, *, data_config: str | None = None, days: int | None = None,
            reference_config: str | None = None, today: date | None = None) -> dict:  # fmt: skip
    """Long: the whole comparison (see the module docstring); returns the monitor document.

    Raises:
        MonitorError / SiteDataError: no reference, no dates for --days, data that cannot be read.
        PackageError: the package cannot be loaded.
    """
    model, meta = load_package(package)
    study_id = str(meta.get("study", {}).get("id") or "")
    task = meta.get("task", "classification")
    reference = _reference(site, study_id, reference_config)
    current, where = _current(site, data_config)
    x, y, facts = _all_images(current)
    if days is not None:
        x, y, facts = _recent(x, y, facts, days, today or date.today(), where)
    notes: list[str] = []
    if not reference["acquisition"]:
        notes.append("the reference has no acquisition metadata (synthetic, MedMNIST or non-DICOM images): "
                     "compared on intensities, labels and predictions")  # fmt: skip
    features = _acquisition_features(reference["acquisition"], facts, notes)
    cur_intensity = intensity_features(x)
    features += [
        numeric_feature(k, "intensity", reference["intensity"][k], cur_intensity[k])
        for k in INTENSITY_FEATURES
    ]
    classes = list(meta["classes"])
    ref_counts = reference["class_counts"]
    names = classes if task != "segmentation" else ["no lesion", "lesion"]
    cur_labels = profile_of(x, y, None, classes)["class_counts"]
    features.append(categorical_feature("class share", "labels",
                                        [n for n, c in zip(names, ref_counts, strict=False) for _ in range(int(c))],
                                        [n for n, c in zip(names, cur_labels, strict=False) for _ in range(int(c))]))  # fmt: skip
    ref_out, cur_out = _outputs(model, reference["sample_x"], task), _outputs(model, x, task)
    if task != "segmentation" and len(classes) > 2:
        features.append(categorical_feature("predicted class", "predictions", [classes[int(i)] for i in ref_out],
                                            [classes[int(i)] for i in cur_out]))  # fmt: skip
    else:
        label = "predicted foreground share" if task == "segmentation" else f"P({classes[1]})"
        features.append(numeric_feature(label, "predictions", ref_out, cur_out))
    site_release = meta.get("performance", {}).get("sites", {}).get(site.site)
    features.append(_performance(model, x, y, task, len(classes), site_release))
    if site_release is None:
        notes.append(f"the package holds no release of site '{site.site}': performance has no reference")
    drifting = [f["feature"] for f in features if f["status"] == "drift"]
    return {
        "kind": MONITOR_KIND, "version": 1, "site": site.site, "package": package_identity(package, meta),
        "task": task, "reference": {"source": reference["path"], "n_train": reference["meta"].get("n_train"),
                                    "n_sample": int(len(reference["sample_x"]))},
        "current": {"source": where, "images": int(len(x)), "days": days}, "features": features,
        "drifting": drifting, "watch": [f["feature"] for f in features if f["status"] == "watch"],
        "notes": notes, "status": "drift" if drifting else "stable",
        "thresholds": {"psi_drift": PSI_DRIFT, "psi_watch": PSI_WATCH, "p": P_DRIFT},
    }  # fmt: skip
