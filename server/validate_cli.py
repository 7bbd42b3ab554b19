"""`fedward validate PACKAGE... --study CONFIG --out DIR`: the command (server.validate does the work).

Runs on the study's sites in Flower's simulation engine; over a deployment the same validation is
`flwr run` with the run config's `validate-packages` (README, "Validate, continue, monitor, promote").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.config import load_study
from common.package import read_meta
from server import tracking
from server.interrupt import interruptible
from server.report.doc import METRIC_LABELS
from server.run_claim import check_run_folder
from server.run_folder import REPORT_FILE, VALIDATION_FILE

HELP = "evaluate model packages at every site, training nothing (each site's policy and budget apply)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "packages", nargs="+", help="model packages: run folders (their model/) or package folders"
    )
    parser.add_argument("--study", required=True, help="the study config whose sites validate them")
    parser.add_argument("--out", required=True, help="folder for validation.json, report.html and the log")
    parser.add_argument("--data-dir", help="folder of data files (overrides FEDWARD_DATA and the config)")
    parser.add_argument(
        "--force", action="store_true", help="--out holds a run: move it aside and start afresh"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    tracking.add_argument(parser)


def table(doc: dict) -> Table:
    cs, metric = doc["cross_site"], doc["metric"]
    out = Table(title=f"fedward validate: test {METRIC_LABELS[metric]} per site ({doc['status']})")
    out.add_column("package", no_wrap=True)
    for c in cs["columns"]:
        out.add_column(c, justify="right", no_wrap=True)
    for label, values, cis in zip(cs["rows"], cs[metric], cs["ci"], strict=True):
        cells = ["-" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")
                 for v, ci in zip(values, cis, strict=True)]  # fmt: skip
        out.add_row(label, *cells)
    return out


def run(args: argparse.Namespace, console: Console) -> int:
    """0 when every package was evaluated at every site, 3 when some site refused or failed."""
    study = load_study(args.study, data_dir=args.data_dir)
    tracker = tracking.Tracker(args.mlflow, console)
    tracker.check()
    # a package that is none, or an --out that cannot be used, is answered before torch, MONAI and Flower
    # load; `validate_simulated` then checks each package against the study, and the folder again
    for package in args.packages:
        read_meta(package)
    check_run_folder(Path(args.out), resume=False, force=args.force, kind="validation")
    from server.simulate import validate_simulated

    with interruptible() as stop:
        doc = validate_simulated(study, args.packages, args.out, force=args.force, verbose=args.verbose,
                                 stop=stop, command=f"fedward validate ... --out {args.out}")  # fmt: skip
    console.print(table(doc))
    for entry in doc["packages"]:
        for site, why in entry["failed"].items():
            console.print(f"- {entry['label']} at {site}: {why}", highlight=False)
    console.print(
        f"validation: {args.out}/{VALIDATION_FILE}   report: {args.out}/{REPORT_FILE}", highlight=False
    )
    tracking.validation_run(tracker, Path(args.out), doc)
    if doc["status"] == "interrupted":
        return stop.exit_code or 130
    return 0 if all(not e["failed"] for e in doc["packages"]) else 3
