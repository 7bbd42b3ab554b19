"""Every model of a study on every site's test data: metrics, intervals, calibration, comparisons.

`Evaluator` predicts each model on each test set once and keeps the probabilities; `compare` builds the
per-site comparison table and the paired gains of federating, `cross_site` the cross-site matrix.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from client.train import device, predict
from common.metrics import public_metrics, site_summary
from common.schema import StudyConfig
from common.sitedata import SiteData
from common.uncertainty import bootstrap_intervals, calibration, paired_difference, roc_points
from server.run_folder import FEDERATED_VARIANTS, LOCAL_OF, Variant, model_key


class Evaluator:
    """Every model on every site's test data (and pooled), with intervals, calibration and ROC."""

    def __init__(self, data: dict[str, SiteData], study: StudyConfig):
        self.data, self.cfg, self.seed = data, study.study, study.seed
        self.labels = {s: d.test_y.numpy().astype(np.int64) for s, d in data.items()}
        self.labels["pooled"] = np.concatenate([self.labels[s] for s in data])
        self.probs: dict[str, dict[str, np.ndarray]] = {}  # model -> test set -> N x C probabilities

    def predict(self, key: str, model: nn.Module, sites: list[str] | None = None) -> None:
        sites = list(self.data) if sites is None else sites
        model = model.to(device())
        self.probs[key] = {s: predict(model, self.data[s].test_x) for s in sites}
        if sites == list(self.data):
            self.probs[key]["pooled"] = np.concatenate([self.probs[key][s] for s in self.data])

    def block(self, labels: np.ndarray, probs: np.ndarray, *, roc: bool) -> dict:
        out = public_metrics(site_summary(labels, probs))
        out["ci"] = bootstrap_intervals(labels, probs, samples=self.cfg.bootstrap_samples, seed=self.seed)
        cal = calibration(labels, probs, bins=self.cfg.calibration_bins)
        out["ece"], out["calibration"] = cal["ece"], cal["bins"]
        if roc:
            out["roc"] = roc_points(labels, probs)
        return out

    def evaluate(self, key: str, *, roc_on: set[str] | None = None) -> dict:
        """{test set: metrics} for a predicted model; ROC points for the test sets in `roc_on`."""
        roc_on = set(self.probs[key]) if roc_on is None else roc_on
        return {s: self.block(self.labels[s], p, roc=s in roc_on) for s, p in self.probs[key].items()}

    def pooled_own(self, keys: dict[str, str]) -> np.ndarray:
        """Pooled predictions where each site's test data is scored by its own model (site -> key)."""
        return np.concatenate([self.probs[keys[s]][s] for s in self.data])

    def difference(self, test_set: str, probs_a: np.ndarray, probs_b: np.ndarray) -> dict:
        return paired_difference(
            self.labels[test_set], probs_a, probs_b, samples=self.cfg.bootstrap_samples, seed=self.seed
        )


def _slim(block: dict) -> dict:
    return {"auc": block.get("auc"), "ci": block.get("ci", {}).get("auc")}


def compare(doc: dict, ev: Evaluator) -> dict:
    """Per site and pooled: AUC (with interval) of each kind of model, and what federating gains.

    Pooled columns: federated and centralized models on all test data together; `local` and
    `local-dp` score each site's test data with that site's own model (what the hospitals would get
    each deploying their own); `leave-one-out` scores each site's data with the model federated
    without it. Gains are paired bootstrap differences on the same resamples.
    """
    models, sites = doc["models"], doc["sites"]
    order = (Variant.LOCAL, Variant.LOCAL_DP, *FEDERATED_VARIANTS, Variant.CENTRALIZED, Variant.LEAVE_ONE_OUT)
    columns = [str(c) for c in order if c in models or any(k.startswith(c + ":") for k in models)]
    rows: dict[str, dict] = {}
    for s in sites:
        row = {}
        for c in columns:
            key = c if c in models else model_key(c, s)
            if key in models and s in models[key]["eval"]:
                row[c] = {"model": key, **_slim(models[key]["eval"][s])}
        rows[s] = row
    rows["pooled"] = _pooled_row(columns, models, sites, ev)
    return {"columns": columns, "rows": rows, "gains": {s: _gains(s, sites, ev) for s in [*sites, "pooled"]}}


def _pooled_row(columns: list[str], models: dict, sites: list[str], ev: Evaluator) -> dict:
    pooled = {}
    for c in columns:
        if c in models:
            pooled[c] = {"model": c, **_slim(models[c]["eval"]["pooled"])}
        elif all(model_key(c, s) in ev.probs for s in sites):
            probs = ev.pooled_own({s: model_key(c, s) for s in sites})
            block = ev.block(ev.labels["pooled"], probs, roc=False)
            pooled[c] = {"model": f"{c}:<each site>", **_slim(block)}
    return pooled


def _gains(test_set: str, sites: list[str], ev: Evaluator) -> dict:
    """Paired AUC differences on `test_set`: each federated model against the local models and
    against centralized training."""
    gains = {}
    for fed in FEDERATED_VARIANTS:
        local = LOCAL_OF[fed]
        if fed not in ev.probs or not all(model_key(local, x) in ev.probs for x in sites):
            continue
        own = (
            ev.pooled_own({x: model_key(local, x) for x in sites})
            if test_set == "pooled"
            else ev.probs[model_key(local, test_set)][test_set]
        )
        gains[f"{fed}_vs_{local}"] = ev.difference(test_set, ev.probs[fed][test_set], own)["auc"]
    if Variant.CENTRALIZED in ev.probs:
        for fed in FEDERATED_VARIANTS:
            if fed in ev.probs:
                central = ev.probs[Variant.CENTRALIZED][test_set]
                gains[f"{fed}_vs_centralized"] = ev.difference(test_set, ev.probs[fed][test_set], central)[
                    "auc"
                ]
    return gains


def cross_site(doc: dict) -> dict:
    """Rows: every model trained on a site, each federated model, centralized; columns: test sets."""
    models, sites = doc["models"], doc["sites"]
    keys = [k for k in models if models[k]["kind"] == Variant.LOCAL]
    keys += [str(v) for v in FEDERATED_VARIANTS if v in models]
    keys += [str(Variant.CENTRALIZED)] if Variant.CENTRALIZED in models else []
    columns = [*sites, "pooled"]
    return {
        "rows": keys,
        "columns": columns,
        "auc": [[models[k]["eval"].get(c, {}).get("auc") for c in columns] for k in keys],
        "ci": [[models[k]["eval"].get(c, {}).get("ci", {}).get("auc") for c in columns] for k in keys],
    }
