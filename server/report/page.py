"""report.html: the page, rendered from templates/report.html (Jinja2, autoescaped).

One self-contained file: the plots are embedded as base64 PNG, there are no scripts and no external
files, so the page can be mailed or archived as it is. Everything on it comes from the run's document
(study.json or results.json): the summary in words, the per-site table, the plots, the details.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from server.report.doc import is_study, is_validation
from server.report.summary import plain_summary
from server.report.tables import run_table, study_tables
from server.report.validation import validation_tables

PAGES = Environment(
    loader=PackageLoader("server.report", "templates"),
    autoescape=True,
    undefined=StrictUndefined,  # a name the template uses and the page does not give is an error
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class Figure:
    id: str  # the figure's HTML id without "fig-": the file's stem
    name: str  # the PNG's file name in the run folder
    caption: str
    data: str  # the PNG, base64


def _meta(doc: dict) -> tuple[str, str]:
    """(what the folder holds, the line under the title: sites, rounds, model, status)."""
    study = doc.get("study", {})
    if is_validation(doc):
        return "validation", (
            f"{len(doc['packages'])} package(s) at {len(doc['sites'])} sites, nothing trained; "
            f"status {doc['status']}"
        )
    if is_study(doc):
        return "study", (
            f"{len(doc['sites'])} sites, {study.get('rounds')} rounds x "
            f"{study.get('train', {}).get('local_epochs')} local epochs, model "
            f"{study.get('model', {}).get('name')}; intervals: {doc['settings']['bootstrap_samples']} "
            f"stratified bootstrap resamples; status {doc['status']}"
        )
    final = doc.get("final", {})
    return "federated run", (
        f"{len(final.get('sites', {}))} sites, {final.get('round', 0)} rounds, "
        f"model {study.get('model', {}).get('name')}, strategy {study.get('strategy', {}).get('name')}; "
        f"status {doc.get('status')}"
    )


def render_html(doc: dict, plots: list[tuple[str, str, Path]]) -> str:
    """The page for `doc`, with the plots (file name, caption, path of the PNG) embedded."""
    kind, meta = _meta(doc)
    if is_validation(doc):
        main, details = validation_tables(doc)
    else:
        main, details = study_tables(doc) if is_study(doc) else (run_table(doc), [])
    figures = [
        Figure(Path(name).stem, name, caption, base64.b64encode(path.read_bytes()).decode("ascii"))
        for name, caption, path in plots
    ]
    return PAGES.get_template("report.html").render(
        kind=kind,
        name=doc.get("study", {}).get("name", ""),
        meta=meta,
        summary=plain_summary(doc),  # from the numbers, so a rebuilt report says the same as its tables
        main=main,
        details=details,
        figures=figures,
    )
