"""The model package a finished run leaves (common.package) and its model card, Markdown and HTML.

The card says what a radiology department must know before it uses the model: its intended use,
the training data by site, the performance at each site on that site's own test data (with how it was
released), the operating point and how it was chosen, the privacy each site spent, and the limitations,
the sites where it does worst first.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from torch import nn

from common.files import write_atomic
from common.model_spec import ModelSpec, model_spec
from common.package import CARD_HTML, CARD_MD, PACKAGE_DIR, write_package
from common.schema import StudyConfig

METRIC_COLUMNS = ("n_test", "auc", "auc_ci", "accuracy", "sensitivity", "specificity", "ece", "release")
SEGMENTATION_COLUMNS = ("n_test", "dice", "hd95", "release")


def input_spec(study: StudyConfig, spec: ModelSpec, site_inputs: dict[str, dict]) -> dict[str, Any]:
    """What the model takes (the study's model spec) and how the training sites read and prepared
    their images, as each site said in its train replies (client.site.SiteRuntime.input_description):
    `fedward predict` prepares new images as the first site (by name) did, or as `--site` names."""
    source = f"medmnist:{study.data.dataset}" if study.data.source == "medmnist" else study.data.source
    out: dict[str, Any] = {"source": source, "modalities": list(spec.modalities), "channels": spec.in_channels,
                           "size": list(spec.size)}  # fmt: skip
    if site_inputs:
        first = site_inputs[sorted(site_inputs)[0]]
        out |= {"format": first.get("format", ""), "colour": first.get("colour", "grey"),
                "frame": first.get("frame", "middle"), "window": first.get("window", []),
                "volume": first.get("volume", False),
                "preprocess": first.get("preprocess", {}), "sites": dict(sorted(site_inputs.items()))}  # fmt: skip
    else:  # no site trained: the study's own statement of the input
        out["preprocess"] = {"size": list(spec.size), "spatial": "resize", "channels": spec.in_channels}
    return out


def package_meta(study: StudyConfig, model_meta: dict, results: dict) -> dict[str, Any]:
    spec = model_spec(study)
    final = results.get("final", {})
    sites = final.get("sites", {})
    return {
        "model": model_meta["model"],
        "in_channels": model_meta["in_channels"],
        "classes": model_meta["classes"],
        "task": spec.task,
        "input": input_spec(study, spec, results.get("site_inputs", {})),
        "operating_point": results.get("operating_point"),
        "performance": {"round": final.get("round"), "sites": sites, "pooled": final.get("pooled", {})},
        "privacy": {
            "enabled": study.privacy.enabled,
            "epsilon": {s: m.get("epsilon") for s, m in sites.items()} if study.privacy.enabled else None,
            "delta": study.privacy.delta if study.privacy.enabled else None,
        },
        "training_data": {
            s: r.get("n_train") for s, r in (results.get("rounds") or [{}])[-1].get("train", {}).items()
        },
        "study": {
            "id": results.get("study_id"),
            "name": study.name,
            "rounds": study.rounds,
            "config": study.to_dict(),
        },
        "lineage": results.get("lineage", []),  # the packages it was trained on from, newest first
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_model_package(
    out_dir: Path, model: nn.Module, study: StudyConfig, model_meta: dict, results: dict
) -> Path:
    meta = package_meta(study, model_meta, results)
    folder = write_package(out_dir / PACKAGE_DIR, model, meta)
    write_atomic(folder / CARD_MD, card_markdown(meta))
    write_atomic(folder / CARD_HTML, card_html(meta))
    return folder


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):  # an interval
        return "-".join(_fmt(v) for v in value)
    return "-" if value is None else str(value)


def _worst_first(meta: dict) -> list[tuple[str, dict]]:
    sites = meta["performance"]["sites"]
    key = "dice" if meta.get("task") == "segmentation" else "auc"
    return sorted(sites.items(), key=lambda kv: (kv[1].get(key) is None, kv[1].get(key) or 0.0))


def _sections(meta: dict) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """(heading, paragraphs, table rows with a header row first) of the card."""
    return [*_main_sections(meta), _lineage_section(meta)]


def _lineage_section(meta: dict) -> tuple[str, list[str], list[list[str]] | None]:
    """Which packages the model was trained on from (`model.init_from`), newest first."""
    lineage = meta.get("lineage") or []
    if not lineage:
        return ("Lineage", ["Trained from fresh weights (no `model.init_from`)."], None)
    first = lineage[0]
    text = (f"Started from the package {first['package']} (study {first.get('study_id')}, round "
            f"{first.get('round')}, weights SHA-256 {first['sha256'][:16]}...), then trained in this study.")  # fmt: skip
    rows = [["package", "study", "round", "weights SHA-256"]]
    rows += [[e["package"], str(e.get("study_id")), str(e.get("round")), e["sha256"][:16]] for e in lineage]
    return ("Lineage", [text], rows)


def _main_sections(meta: dict) -> list[tuple[str, list[str], list[list[str]] | None]]:
    op = meta.get("operating_point") or {}
    privacy = meta["privacy"]
    columns = SEGMENTATION_COLUMNS if meta.get("task") == "segmentation" else METRIC_COLUMNS
    rows = [["site", *columns, "training images", "epsilon"]]
    for site, m in _worst_first(meta):
        eps = (privacy.get("epsilon") or {}).get(site)
        rows.append(
            [
                site,
                *(_fmt(m.get(c)) for c in columns),
                _fmt(meta["training_data"].get(site)),
                _fmt(eps),
            ]
        )
    worst = _worst_first(meta)[0] if meta["performance"]["sites"] else None
    return [
        ("Intended use", [
            f"{'Segments' if meta.get('task') == 'segmentation' else 'Classifies'} {meta['input'].get('source')} "
            f"images into {', '.join(meta['classes'])}, as decision support "
            "for a radiologist, never alone. Trained by federated learning with fedward: no image left a site.",
            (f"For {', '.join(meta['input']['modalities'])} images: `fedward predict` marks a file of any other "
             "modality, and one smaller than the model's input." if meta["input"].get("modalities") else
             "The study did not say which modality it is for (`input.modalities`): `fedward predict` cannot "
             "mark images of another modality."),
        ], None),
        ("Performance at each site (its own test data), worst first", [
            f"Global model after round {meta['performance']['round']}. `release` says what the site let out: "
            "exact metrics, its summary, or noised counts (dp_histogram) from which these were computed. "
            + ("`dice` is the mean Dice over the site's test images that hold each class, `hd95` their mean 95% "
               "Hausdorff distance in pixels." if meta.get("task") == "segmentation" else
               "`auc_ci` is a 95% interval from the site's counts (Hanley-McNeil, widened by the release's noise "
               "and its ties); `ece` the expected calibration error of its score histogram (10 bins; 0 is "
               "perfectly calibrated)."),
        ], rows),
        ("Operating point", [
            f"Threshold {_fmt(op.get('threshold'))} on the probability of '{op.get('class', '-')}', chosen by "
            f"{op.get('rule', 'none (arg-max, 0.5)')} on {op.get('chosen_on', 'no validation data')}."
            if op else "None chosen: the label is the arg-max (a threshold of 0.5 for two classes).",
        ], [["site", "test sensitivity", "test specificity"],
            *([s, _fmt(r.get("sensitivity")), _fmt(r.get("specificity"))] for s, r in op.get("test", {}).items())]
         if op else None),
        ("Privacy", [
            (f"Differential privacy per site; epsilon spent (delta {privacy['delta']}) is in the table above."
             if privacy["enabled"] else "Trained without differential privacy: the updates the coordinator saw "
             "were not protected."),
        ], None),
        ("Limitations", [
            (f"Worst at {worst[0]} ({columns[1]} {_fmt(worst[1].get(columns[1]))}): check it on your own data "
             "before use."
             if worst else "No per-site evaluation was recorded."),
            "Validated only on the sites above; other scanners, protocols and populations may differ.",
        ], None),
    ]  # fmt: skip


def card_markdown(meta: dict) -> str:
    lines = [f"# Model card: {meta['study']['name']} ({meta['model']})", ""]
    for heading, paragraphs, rows in _sections(meta):
        lines += [f"## {heading}", "", *paragraphs, ""]
        if rows:
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    return "\n".join(lines)


def card_html(meta: dict) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(meta['study']['name'])}</title>",
             f"<h1>Model card: {e(meta['study']['name'])} ({e(meta['model'])})</h1>"]  # fmt: skip
    for heading, paragraphs, rows in _sections(meta):
        parts.append(f"<h2>{e(heading)}</h2>" + "".join(f"<p>{e(p)}</p>" for p in paragraphs))
        if rows:
            head = "".join(f"<th>{e(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            parts.append(f"<table border='1'><tr>{head}</tr>{body}</table>")
    return "\n".join(parts) + "\n"
