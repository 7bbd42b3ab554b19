"""A validation's report (`fedward validate`, validation.json): tables and summary (its plot:
server.report.plots).

The main table is the cross-site table (each package on each site's test data, and pooled, with the
95% AUC interval each site's release allows); the details give each package's per-site metrics, what
each site released, and which sites refused. Every number comes from validation.json.
"""

from __future__ import annotations

from server.report.doc import METRIC_LABELS, score_text
from server.report.tables import MISSING, Cell, Table, number, value_cell

DETAIL_COLUMNS = {
    "auc": ("n_test", "auc", "sensitivity", "specificity", "ece", "release", "evaluation_epsilon"),
    "dice": ("n_test", "dice", "hd95", "release", "evaluation_epsilon"),
}
DETAIL_HEAD = {"n_test": "test", "auc": "AUC", "dice": "Dice", "hd95": "HD95 (px)", "ece": "ECE",
               "release": "release", "evaluation_epsilon": "evaluation ε", "sensitivity": "sensitivity",
               "specificity": "specificity"}  # fmt: skip


def _value(metrics: dict, key: str) -> Cell:
    value = metrics.get(key)
    if key == "n_test":
        return Cell(MISSING if value is None else str(value))
    if key == "release":
        return Cell(str(value or MISSING))
    if key in ("auc", "dice"):
        return value_cell(value, metrics.get(f"{key}_ci"))
    return Cell(number(value, 2 if key in ("hd95", "evaluation_epsilon") else 3))


def validation_tables(doc: dict) -> tuple[Table, list[Table]]:
    """The cross-site table, and per package its per-site table."""
    cs, metric = doc["cross_site"], doc["metric"]
    rows = [
        [Cell(label), *[value_cell(v, ci) for v, ci in zip(values, cis, strict=True)]]
        for label, values, cis in zip(cs["rows"], cs[metric], cs["ci"], strict=True)
    ]
    caption = (f"Test {METRIC_LABELS[metric]} of each package at each site [95% interval from the site's "
               "release]; pooled: the sites whose releases add up")  # fmt: skip
    main = Table("validation-table", caption, ["package", *cs["columns"]], rows)
    details = []
    for i, entry in enumerate(doc["packages"]):
        keys = DETAIL_COLUMNS[metric]
        body = [[Cell(s), *[_value(m, k) for k in keys]] for s, m in entry["sites"].items()]
        body.append([Cell("pooled", bold=True), *[_value(entry["pooled"], k) for k in keys]])
        body += [[Cell(s), Cell(f"refused or failed: {why}"), *[Cell("") for _ in keys[1:]]]
                 for s, why in entry["failed"].items()]  # fmt: skip
        caption = f"{entry['label']}: {entry['package']} (study {entry.get('study_id')}, weights {entry['sha256'][:12]})"
        details.append(
            Table(f"package-{i + 1}-table", caption, ["site", *[DETAIL_HEAD[k] for k in keys]], body)
        )
    return main, details


def validation_summary(doc: dict) -> list[str]:
    """Per package: pooled metric, the worst site, the sites that refused."""
    metric, name = doc["metric"], METRIC_LABELS[doc["metric"]]
    lines = []
    for entry in doc["packages"]:
        scored = {s: m.get(metric) for s, m in entry["sites"].items() if m.get(metric) is not None}
        line = f"{entry['label']}: pooled {name} {score_text(entry['pooled'].get(metric))}"
        if scored:
            worst = min(scored, key=scored.get)
            line += f"; worst at {worst} ({score_text(scored[worst])}) of {len(scored)} site(s)"
        if entry["failed"]:
            line += f"; not evaluated at {', '.join(sorted(entry['failed']))} (refused or failed)"
        lines.append(line + ".")
    if doc.get("status") != "completed":
        lines.append(f"The validation did not finish (status {doc.get('status')}).")
    lines.append("Each site released what its evaluation policy allows and charged its evaluation budget; "
                 "`fedward compare OLD NEW` says whether a package may replace another.")  # fmt: skip
    return lines
