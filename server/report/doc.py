"""What the report reads from a run's document: a study or one federated run, its runs and sites.

A document is study.json (`fedward study`), results.json (`fedward simulate`) or validation.json
(`fedward validate`, server.report.validation), checked by
`server.report.load_run`; the summary, the plots and the page all see the run through these helpers.
"""

from __future__ import annotations

from server.run_folder import STUDY_KIND, VALIDATION_KIND, VARIANT_LABELS, Variant, site_names, split_key


def is_study(doc: dict) -> bool:
    return doc.get("kind") == STUDY_KIND


def is_validation(doc: dict) -> bool:
    return doc.get("kind") == VALIDATION_KIND


def is_private(results: dict) -> bool:
    """Did this federated run train with differential privacy (its results.json's study config)?"""
    return bool(results.get("study", {}).get("privacy", {}).get("enabled"))


def federated_runs(doc: dict) -> dict[str, dict]:
    """{variant: results.json dict} of the federated runs in a study, or the one run of a simulate folder."""
    if not is_study(doc):
        return {str(Variant.FEDERATED_DP if is_private(doc) else Variant.FEDERATED): doc}
    return {v: doc["models"][v]["results"] for v in doc["variants"] if v in doc["models"]}


def sites_of(doc: dict) -> list[str]:
    """The study's sites, or those of a plain run in the order its results.json lists them."""
    return list(doc["sites"]) if is_study(doc) else site_names(doc)


METRIC_LABELS = {"auc": "AUC", "dice": "Dice"}  # a run's headline metric, as the report names it


def metric_of(doc: dict) -> str:
    """The run's headline metric: `dice` for a segmentation study, else `auc`."""
    return "dice" if doc.get("study", {}).get("task") == "segmentation" else "auc"


def score_text(x: float | None) -> str:
    """An AUC or a Dice as the summary and the plots' legends write it."""
    return "n/a" if x is None else f"{x:.3f}"


def model_label(key: str, *, at_site: str | None = None) -> str:
    """A study model's key in words: `local-dp:hospital-a` -> "hospital-a alone, DP"; a site's own
    FedBN or fine-tuned model without the site's name where the text already says `at_site`."""
    kind, site = split_key(key)
    if site is not None and kind in (Variant.FEDBN, Variant.FINE_TUNED):
        return VARIANT_LABELS[kind] if site == at_site else f"{site}: {VARIANT_LABELS[kind]}"
    if site is not None:
        return f"{site} alone" + (", DP" if kind == Variant.LOCAL_DP else "")
    return VARIANT_LABELS.get(key, key)
