"""`fedward report DIR`: report.html and the plots, rebuilt from a run folder's JSON alone.

    fedward report runs/study-demo     # a `fedward study` folder (study.json)
    fedward report runs/demo           # a `fedward simulate` folder (results.json only)
    fedward report runs/validate       # a `fedward validate` folder (validation.json)

Writes into DIR: auc_by_round.png (dice_by_round.png for segmentation), epsilon_by_round.png (when
privacy was on), and for a study also roc_curves.png (classification), cross_site.png and
comparison.png (for a validation, validation.png); then report.html, one self-contained file with the
plots embedded (no scripts, no external files), the per-site tables and a plain-language summary.
Nothing is recomputed from models or data: every number comes from study.json / results.json, which
`load_run` checks first, so a file of the wrong shape ends in a ReportError that names it.

    shape.py     what the report reads from study.json and results.json, and the check
    doc.py       a study, one federated run or a validation: its runs, sites and model names
    validation.py   a validation's tables and summary
    summary.py   the summary in words (plain_summary)
    tables.py    the tables as rows of cells (also the terminal table of `fedward simulate`)
    plots.py     the matplotlib plots, a validation's too (imported only to draw them)
    page.py      report.html from templates/report.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.files import write_atomic
from server.report.doc import METRIC_LABELS, is_validation, metric_of
from server.report.page import render_html
from server.report.shape import RESULTS, STUDY, VALIDATION, ShapeError, check
from server.report.summary import plain_summary
from server.run_folder import (
    REPORT_FILE,
    RESULTS_FILE,
    STUDY_FILE,
    STUDY_KIND,
    VALIDATION_FILE,
    VALIDATION_KIND,
)

__all__ = ["ReportError", "build_report", "cli", "load_run", "plain_summary"]


class ReportError(ValueError):
    """The folder holds no run a report can be built from: the message names the file and what is wrong."""


def _read_json(path: Path):
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReportError(f"'{path}' cannot be read ({err.strerror or err}).") from err
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ReportError(f"'{path}' is not valid JSON ({err}); was the run interrupted?") from err


def _check_study(path: Path, doc) -> None:
    if not isinstance(doc, dict) or doc.get("kind") != STUDY_KIND:
        what = f"its 'kind' is {doc.get('kind')!r}" if isinstance(doc, dict) else "it is not a JSON object"
        raise ReportError(f"'{path}' is not a `fedward study` {STUDY_FILE} ({what}, not '{STUDY_KIND}').")
    if "comparison" not in doc and doc.get("status") == "running":
        raise ReportError(
            f"'{path}' holds a study that has not finished (status 'running', no comparison yet); "
            f"`fedward study` writes the report when every part has run."
        )
    check(doc, STUDY)


def _check_validation(path: Path, doc) -> None:
    if not isinstance(doc, dict) or doc.get("kind") != VALIDATION_KIND:
        raise ReportError(
            f"'{path}' is not a `fedward validate` {VALIDATION_FILE} (kind not '{VALIDATION_KIND}')."
        )
    check(doc, VALIDATION)


def _check_results(path: Path, doc) -> None:
    if isinstance(doc, dict) and doc.get("kind") == STUDY_KIND:
        raise ReportError(f"'{path}' holds a study, not one federated run: name it {STUDY_FILE}.")
    check(doc, RESULTS)


def load_run(run_dir: str | Path) -> dict:
    """study.json when DIR holds a study, else results.json of a plain federated run, checked.

    Raises:
        ReportError: DIR holds neither file, or the file is not JSON, or not of the shape the report
            reads (the message names the file and the key that is wrong).
    """
    d = Path(run_dir)
    for name, checker in (
        (STUDY_FILE, _check_study),
        (VALIDATION_FILE, _check_validation),
        (RESULTS_FILE, _check_results),
    ):
        path = d / name
        if path.is_file():
            doc = _read_json(path)
            try:
                checker(path, doc)
            except ShapeError as err:
                raise ReportError(f"'{path}' is not a fedward {name} the report can read: {err}.") from err
            return doc
    raise ReportError(
        f"'{d}' holds none of {STUDY_FILE}, {VALIDATION_FILE}, {RESULTS_FILE}: give the --out folder of a "
        f"`fedward study`, `fedward validate` or `fedward simulate` run."
    )


def build_report(run_dir: str | Path) -> Path:
    """Write the plots and report.html into `run_dir` from its JSON; returns the report's path.

    Raises:
        ReportError: see `load_run`.
    """
    from server.report.plots import PLOTS, VALIDATION_PLOTS  # matplotlib: only when drawing

    d = Path(run_dir)
    doc = load_run(d)
    plots, metric = [], metric_of(doc)
    chosen = VALIDATION_PLOTS if is_validation(doc) else PLOTS
    for name, fn, caption in chosen:
        name, caption = (t.format(metric=metric, label=METRIC_LABELS[metric]) for t in (name, caption))
        path = fn(doc, d / name)
        if path is not None:
            plots.append((name, caption, path))
    report = d / REPORT_FILE
    page = render_html(doc, plots)
    write_atomic(report, page)
    return report


def cli(args: argparse.Namespace, console=None) -> int:
    """`fedward report DIR` (server.cli): 0 when written, 2 when DIR holds no run a report can read."""
    try:
        path = build_report(args.dir)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = [p.name for p in sorted(Path(args.dir).glob("*.png"))]
    print(f"report: {path}   plots: {', '.join(written)}")
    return 0
