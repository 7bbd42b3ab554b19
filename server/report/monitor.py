"""A drift monitor's report (`fedward site monitor`, client.monitor): monitor.json, report.html with the
feature table, a summary in words and one plot per drifting (or to-watch) feature, all at the site.

    write_monitor_report(out_dir, doc) -> report.html's path
"""

from __future__ import annotations

import base64
from pathlib import Path

from matplotlib.figure import Figure as PlotFigure

from common.files import write_atomic, write_json
from server.report.page import PAGES, Figure
from server.report.plots import DPI  # also chooses matplotlib's file-only backend
from server.report.tables import Cell, Table, number
from server.run_folder import MONITOR_FILE, REPORT_FILE


def _cells(f: dict) -> list[Cell]:
    if f["kind"] == "performance":
        cur, ref = f["current"], f["reference"]
        span = lambda b: f"[{b['ci'][0]:.3f}–{b['ci'][1]:.3f}]" if b.get("ci") else ""  # noqa: E731
        return [Cell(f["feature"]), Cell(f["group"]), Cell("–"), Cell("intervals"), Cell("–"),
                Cell(number(ref.get("value")), span(ref)), Cell(number(cur.get("value")), span(cur)),
                Cell(f["status"], bold=f["status"] != "stable")]  # fmt: skip
    if f["kind"] == "numeric":
        ref, cur = f"median {f['reference']['median']:.4g}", f"median {f['current']['median']:.4g}"
    else:
        ref = ", ".join(f"{k} {v}" for k, v in f["reference"]["counts"].items())
        cur = ", ".join(f"{k} {v}" for k, v in f["current"]["counts"].items())
    return [Cell(f["feature"]), Cell(f["group"]), Cell(f"{f['psi']:.3f}"), Cell(f["test"]), Cell(f"{f['p']:.2g}"),
            Cell(ref), Cell(cur), Cell(f["status"], bold=f["status"] != "stable")]  # fmt: skip


def summary(doc: dict) -> list[str]:
    lines = [
        f"Site {doc['site']}, package {doc['package']['package']} (study {doc['package'].get('study_id')}): "
        f"{doc['current']['images']} current image(s) from {doc['current']['source']}"
        + (f", acquired in the last {doc['current']['days']} days" if doc["current"].get("days") else "")
        + f", against {doc['reference']['n_train']} training image(s) kept at the site."
    ]
    if doc["drifting"]:
        lines.append(f"DRIFT in {len(doc['drifting'])} feature(s): {', '.join(doc['drifting'])}.")
    else:
        lines.append("No feature drifts (PSI below 0.25 or the difference within chance).")
    if doc["watch"]:
        lines.append(f"To watch: {', '.join(doc['watch'])}.")
    return lines + list(doc["notes"]) + ["Nothing of this left the site."]


def _plot(f: dict, path: Path) -> Path:
    fig = PlotFigure(figsize=(5.2, 3.2))
    ax = fig.subplots()
    if f["kind"] == "numeric":
        h = f["histogram"]
        edges, width = h["edges"], h["edges"][1] - h["edges"][0]
        for key, colour in (("reference", "tab:blue"), ("current", "tab:red")):
            counts = h[key]
            total = max(sum(counts), 1)
            ax.bar(
                edges[:-1],
                [c / total for c in counts],
                width,
                align="edge",
                alpha=0.5,
                color=colour,
                label=key,
            )
        ax.set_xlabel(f["feature"])
    else:
        cats = list(f["reference"]["counts"])
        for k, (key, colour) in enumerate((("reference", "tab:blue"), ("current", "tab:red"))):
            total = max(sum(f[key]["counts"].values()), 1)
            xs = [i + (k - 0.5) * 0.4 for i in range(len(cats))]
            ax.bar(xs, [f[key]["counts"][c] / total for c in cats], 0.4, color=colour, label=key)
        ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
    ax.set_ylabel("share of images")
    ax.set_title(f"{f['feature']}: PSI {f['psi']:.2f}, p {f['p']:.2g} ({f['status']})")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def write_monitor_report(out_dir: str | Path, doc: dict) -> Path:
    """monitor.json, one PNG per drifting or to-watch feature, and report.html in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MONITOR_FILE, doc)
    head = ["feature", "group", "PSI", "test", "p", "reference", "current", "status"]
    table = Table("monitor-table", "Each feature: reference (training at this site) against current", head,
                  [_cells(f) for f in doc["features"]])  # fmt: skip
    figures = []
    for i, f in enumerate(
        x for x in doc["features"] if x["status"] != "stable" and x["kind"] != "performance"
    ):
        name = f"drift-{i + 1}.png"
        path = _plot(f, out / name)
        figures.append(Figure(Path(name).stem, name, f"{f['feature']} ({f['group']}): reference and current",
                              base64.b64encode(path.read_bytes()).decode("ascii")))  # fmt: skip
    page = PAGES.get_template("report.html").render(
        kind="drift monitor", name=doc["site"], meta=f"status {doc['status']}", summary=summary(doc),
        main=table, details=[], figures=figures,
    )  # fmt: skip
    report = out / REPORT_FILE
    write_atomic(report, page)
    return report
