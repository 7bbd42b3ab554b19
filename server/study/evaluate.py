"""Every model of a study on every site's test data: metrics, intervals, calibration, comparisons.

An evaluator predicts each model on each test set once and keeps what its metrics are computed from
(`outputs`): class probabilities for classification (`Evaluator`: AUC, sensitivity, specificity with
bootstrap intervals, calibration, ROC), each image's Dice and HD95 for segmentation
(`SegmentationEvaluator`: mean Dice and HD95 with bootstrap intervals). `compare` builds the per-site
comparison table and the paired gains of federating in the evaluator's headline metric (`metric`),
`cross_site` the cross-site matrix.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss
from torch import nn

from client.train import device, predict
from common.evaluation_blocks import classification_block, segmentation_block
from common.metrics import pooled_auc_parts, public_metrics, site_summary
from common.schema import StudyConfig
from common.seg_metrics import (
    paired_score_difference,
    per_image_scores,
    segmentation_summary,
    sums_from_scores,
)
from common.sitedata import SiteData
from common.uncertainty import paired_difference
from server.run_folder import FEDERATED_VARIANTS, LOCAL_OF, PERSONALIZED, Variant, model_key


class Evaluator:
    """Every classification model on every site's test data (and pooled), with intervals,
    calibration and ROC."""

    metric = "auc"  # the headline metric of the comparison and the cross-site matrix

    def __init__(self, data: dict[str, SiteData], study: StudyConfig):
        self.data, self.cfg, self.seed = data, study.study, study.seed
        self.labels = {s: d.test_y.numpy().astype(np.int64) for s, d in data.items()}
        self.labels["pooled"] = np.concatenate([self.labels[s] for s in data])
        self.outputs: dict[str, dict[str, np.ndarray]] = {}  # model -> test set -> its predictions' record

    def _outputs(self, model: nn.Module, site: str) -> np.ndarray:
        return predict(model, self.data[site].test_x)  # N x C probabilities

    def validation_score(self, model: nn.Module, site: str) -> tuple[float | None, float | None] | None:
        """(headline metric, cross-entropy) of `model` on the site's validation images (None without
        any). The cross-entropy breaks ties: a small validation set often gives several models the
        same AUC (every positive ranked above every negative but one, say)."""
        d = self.data[site]
        if d.val_x is None or len(d.val_x) == 0:
            return None
        labels, probs = d.val_y.numpy(), predict(model.to(device()), d.val_x)
        auc = public_metrics(site_summary(labels, probs))["auc"]
        return auc, float(log_loss(labels, probs, labels=list(range(probs.shape[1]))))

    def predict(self, key: str, model: nn.Module, sites: list[str] | None = None) -> None:
        sites = list(self.data) if sites is None else sites
        model = model.to(device())
        self.outputs[key] = {s: self._outputs(model, s) for s in sites}
        if sites == list(self.data):
            self.outputs[key]["pooled"] = np.concatenate([self.outputs[key][s] for s in self.data])

    def block(self, test_set: str, probs: np.ndarray, *, roc: bool) -> dict:
        return classification_block(self.labels[test_set], probs, samples=self.cfg.bootstrap_samples,
                                    seed=self.seed, bins=self.cfg.calibration_bins, roc=roc)  # fmt: skip

    def evaluate(self, key: str, *, roc_on: set[str] | None = None) -> dict:
        """{test set: metrics} for a predicted model; ROC points for the test sets in `roc_on`."""
        roc_on = set(self.outputs[key]) if roc_on is None else roc_on
        out = {s: self.block(s, o, roc=s in roc_on) for s, o in self.outputs[key].items()}
        if "pooled" in out:
            out["pooled"].update(self.pooled_parts(self.outputs[key]))
        return out

    def pooled_parts(self, by_site: dict[str, np.ndarray]) -> dict:
        """`auc_parts` of the pooled AUC (common.metrics.pooled_auc_parts: the pairs within a site and
        across sites) for these outputs of every site (other keys ignored); empty where undefined."""
        sites = list(self.data)
        parts = pooled_auc_parts([self.labels[s] for s in sites], [by_site[s] for s in sites])
        return {"auc_parts": parts} if parts else {}

    def pooled_own(self, keys: dict[str, str]) -> np.ndarray:
        """Pooled outputs where each site's test data is scored by its own model (site -> key)."""
        return np.concatenate([self.outputs[keys[s]][s] for s in self.data])

    def pooled_of_own(self, keys: dict[str, str]) -> dict:
        """The headline metric with its interval (and `auc_parts`) on all test data together, each
        site's test data scored by its own model (site -> key): what the hospitals get, each
        deploying its own."""
        block = self.block("pooled", self.pooled_own(keys), roc=False)
        return {
            **_slim(block, self.metric),
            **self.pooled_parts({s: self.outputs[keys[s]][s] for s in self.data}),
        }

    def difference(self, test_set: str, outputs_a: np.ndarray, outputs_b: np.ndarray) -> dict:
        """{metric: {difference, ci}}: model a minus model b on the same bootstrap resamples."""
        return paired_difference(
            self.labels[test_set], outputs_a, outputs_b, samples=self.cfg.bootstrap_samples, seed=self.seed
        )


class SegmentationEvaluator(Evaluator):
    """Every segmentation model on every site's test data: each image's Dice and HD95 per foreground
    class (common.seg_metrics, MONAI's metrics on the arg-max label maps), their means (pooled: over
    every image of every site, as the federation pools its sites' sums) with bootstrap intervals."""

    metric = "dice"
    PREDICT_BATCH = 16  # a UNet's activations per image are large: predict a few at a time

    def _outputs(self, model: nn.Module, site: str) -> np.ndarray:
        pred = predict(model, self.data[site].test_x, batch_size=self.PREDICT_BATCH).argmax(axis=1)
        dice, hd95 = per_image_scores(self.labels[site], pred, self.data[site].num_classes)
        return np.stack([dice, hd95], axis=1)  # N x 2 x (classes - 1)

    def block(self, test_set: str, scores: np.ndarray, *, roc: bool) -> dict:
        return segmentation_block(scores, samples=self.cfg.bootstrap_samples, seed=self.seed)

    def pooled_parts(self, by_site: dict[str, np.ndarray]) -> dict:
        return {}  # Dice is a mean over images: no pairs to split

    def validation_score(self, model: nn.Module, site: str) -> tuple[float | None, float | None] | None:
        """(mean Dice, None): Dice over every validation image rarely ties, so nothing breaks ties."""
        d = self.data[site]
        if d.val_x is None or len(d.val_x) == 0:
            return None
        pred = predict(model.to(device()), d.val_x, batch_size=self.PREDICT_BATCH).argmax(axis=1)
        scores = per_image_scores(d.val_y.numpy(), pred, d.num_classes)
        return segmentation_summary(sums_from_scores(*scores))["dice"], None

    def difference(self, test_set: str, outputs_a: np.ndarray, outputs_b: np.ndarray) -> dict:
        return paired_score_difference(
            outputs_a, outputs_b, samples=self.cfg.bootstrap_samples, seed=self.seed
        )


def evaluator_for(data: dict[str, SiteData], study: StudyConfig) -> Evaluator:
    """The evaluator of the study's task."""
    return (SegmentationEvaluator if study.task == "segmentation" else Evaluator)(data, study)


def _slim(block: dict, metric: str) -> dict:
    return {metric: block.get(metric), "ci": block.get("ci", {}).get(metric)}


def compare(doc: dict, ev: Evaluator) -> dict:
    """Per site and pooled: the headline metric (with interval) of each kind of model, and what
    federating gains.

    Pooled columns: federated and centralized models on all test data together; `local` and
    `local-dp` score each site's test data with that site's own model (what the hospitals would get
    each deploying their own); `leave-one-out` scores each site's data with the model federated
    without it. Gains are paired bootstrap differences on the same resamples.
    """
    models, sites = doc["models"], doc["sites"]
    order = (Variant.LOCAL, Variant.LOCAL_DP, *FEDERATED_VARIANTS, *PERSONALIZED, Variant.CENTRALIZED,
             Variant.LEAVE_ONE_OUT)  # fmt: skip
    columns = [str(c) for c in order if c in models or any(k.startswith(c + ":") for k in models)]
    rows: dict[str, dict] = {}
    for s in sites:
        row = {}
        for c in columns:
            key = c if c in models else model_key(c, s)
            if key in models and s in models[key]["eval"]:
                row[c] = {"model": key, **_slim(models[key]["eval"][s], ev.metric)}
        rows[s] = row
    rows["pooled"] = _pooled_row(columns, models, sites, ev)
    gains = {s: _gains(s, sites, ev, doc["primary"]) for s in [*sites, "pooled"]}
    return {"metric": ev.metric, "columns": columns, "rows": rows, "gains": gains}


def _pooled_row(columns: list[str], models: dict, sites: list[str], ev: Evaluator) -> dict:
    pooled = {}
    for c in columns:
        if c in models:
            block = models[c]["eval"]["pooled"]
            parts = {"auc_parts": block["auc_parts"]} if "auc_parts" in block else {}
            pooled[c] = {"model": c, **_slim(block, ev.metric), **parts}
        elif all(model_key(c, s) in ev.outputs for s in sites):
            pooled[c] = {"model": f"{c}:<each site>", **ev.pooled_of_own({s: model_key(c, s) for s in sites})}
    return pooled


def _gains(test_set: str, sites: list[str], ev: Evaluator, primary: str) -> dict:
    """Paired differences of the headline metric on `test_set`: each federated model against the local
    models and against centralized training; each site's personalized models (fedbn, fine-tuned)
    against the local models of the primary federation's privacy."""

    def own(kind: str) -> np.ndarray | None:  # a per-site family scored on test_set (pooled: each its own)
        keys = {x: model_key(kind, x) for x in sites}
        if not all(k in ev.outputs for k in keys.values()):
            return None
        return ev.pooled_own(keys) if test_set == "pooled" else ev.outputs[keys[test_set]][test_set]

    gains = {}
    for fed in FEDERATED_VARIANTS:
        alone = own(LOCAL_OF[fed])
        if fed in ev.outputs and alone is not None:
            gains[f"{fed}_vs_{LOCAL_OF[fed]}"] = ev.difference(test_set, ev.outputs[fed][test_set], alone)[
                ev.metric
            ]
    alone = own(LOCAL_OF[primary])
    for kind in PERSONALIZED:
        mine = own(kind)
        if mine is not None and alone is not None:
            gains[f"{kind}_vs_{LOCAL_OF[primary]}"] = ev.difference(test_set, mine, alone)[ev.metric]
    if Variant.CENTRALIZED in ev.outputs:
        central = ev.outputs[Variant.CENTRALIZED][test_set]
        for fed in FEDERATED_VARIANTS:
            if fed in ev.outputs:
                gains[f"{fed}_vs_centralized"] = ev.difference(test_set, ev.outputs[fed][test_set], central)[
                    ev.metric
                ]
    return gains


def cross_site(doc: dict, metric: str) -> dict:
    """Rows: every model trained on a site, each federated model, centralized; columns: test sets;
    values: the headline metric (`metric`) and its interval."""
    models, sites = doc["models"], doc["sites"]
    keys = [k for k in models if models[k]["kind"] in (Variant.LOCAL, "personalized")]
    keys += [str(v) for v in FEDERATED_VARIANTS if v in models]
    keys += [str(Variant.CENTRALIZED)] if Variant.CENTRALIZED in models else []
    columns = [*sites, "pooled"]
    return {
        "rows": keys,
        "columns": columns,
        "metric": metric,
        metric: [[models[k]["eval"].get(c, {}).get(metric) for c in columns] for k in keys],
        "ci": [[models[k]["eval"].get(c, {}).get("ci", {}).get(metric) for c in columns] for k in keys],
    }
