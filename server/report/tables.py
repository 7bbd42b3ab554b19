"""The report's tables as rows of cells: one federated run's per-site rows, and a study's tables.

`run_rows(results)` turns a results.json into one row per site and one for all test data pooled; the
terminal table at the end of `fedward simulate` (server.progress) and the report's per-site table of a
plain run both show these rows. The study's tables (the comparison, each federated model's intervals
and calibration, the sites left out, the cross-site matrix) are for the page only; page.py renders
them all through templates/report.html.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.report.doc import METRIC_LABELS, is_private, metric_of, model_label
from server.run_folder import LOCAL_OF, VARIANT_LABELS, Variant

MISSING = "–"  # a value the run does not have
# a plain run's final metrics per headline metric: (keys, report header, terminal header); the
# header's first columns are the site, its sizes and the initial model's headline metric
RUN_COLUMNS = {
    "auc": (
        ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy"),
        ("site", "train", "test", "AUC 0", "AUC", "accuracy", "sensitivity", "specificity", "balanced acc."),
        ("site", "train", "test", "AUC 0", "AUC", "acc", "sens", "spec", "bal acc"),
    ),
    "dice": (
        ("dice", "hd95"),
        ("site", "train", "test", "Dice 0", "Dice", "HD95 (px)"),
        ("site", "train", "test", "Dice 0", "Dice", "HD95 (px)"),
    ),
}
DIGITS = {"hd95": 2}  # decimals where not 3


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, an interval shown smaller after it, bold for the pooled row."""

    text: str
    ci: str = ""
    bold: bool = False


@dataclass(frozen=True)
class Table:
    id: str  # the HTML id, e.g. "per-site-table"
    caption: str
    head: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class RunRow:
    """One site of a federated run (or "pooled": all test data together) after its last round."""

    site: str
    n_train: int | None  # images trained on in the last round (pooled: all sites)
    n_test: int | None
    initial: float | None  # the initial model's headline metric (AUC or Dice), before round 1
    values: dict[str, float | None]  # the final metrics, in RUN_COLUMNS order
    epsilon: float | None  # with privacy: the site's whole ledger; never for pooled
    pooled: bool = False

    def texts(self, private: bool, missing: str = MISSING) -> list[str]:
        """The row's cells as text, the site first: counts, metrics to 3 decimals (HD95 2), ε to 2."""
        out = [self.site, *(missing if n is None else str(n) for n in (self.n_train, self.n_test))]
        out.append(number(self.initial, missing=missing))
        out += [number(v, DIGITS.get(k, 3), missing=missing) for k, v in self.values.items()]
        if private:
            out.append("" if self.pooled else number(self.epsilon, 2, missing=missing))
        return out


def number(value: float | str | None, digits: int = 3, *, missing: str = MISSING) -> str:
    """A value for a table: missing, a word where the file holds one (an epsilon's "unbounded"), or
    the number to `digits` places."""
    if isinstance(value, str):
        return value
    return missing if value is None else f"{value:.{digits}f}"


def _interval(ci: list[float] | None, sign: str = "") -> str:
    return f"[{ci[0]:{sign}.3f}–{ci[1]:{sign}.3f}]" if ci else ""


def value_cell(value: float | None, ci: list[float] | None = None) -> Cell:
    return Cell(number(value), _interval(ci) if value is not None else "")


def run_rows(results: dict) -> list[RunRow]:
    """Per site (in results.json's order) and pooled: sizes, the initial AUC (Dice), the final metrics."""
    final, initial = results.get("final", {}), results.get("initial", {})
    metric = metric_of(results)
    keys = RUN_COLUMNS[metric][0]
    train = results["rounds"][-1].get("train", {}) if results.get("rounds") else {}
    rows = []
    for site, m in [*final.get("sites", {}).items(), ("pooled", final.get("pooled", {}))]:
        pooled = site == "pooled"
        init = (initial.get("pooled") if pooled else initial.get("sites", {}).get(site)) or {}
        if pooled:
            n_train = sum(t["n_train"] for t in train.values()) or None
        else:
            n_train = train.get(site, {}).get("n_train")
        rows.append(
            RunRow(
                site,
                n_train,
                m.get("n_test"),
                init.get(metric),
                {k: m.get(k) for k in keys},
                epsilon=None if pooled else m.get("epsilon"),
                pooled=pooled,
            )
        )
    return rows


def run_table(results: dict) -> Table:
    """The per-site table of a plain federated run."""
    private = is_private(results)
    rows = [
        [Cell(t, bold=r.pooled and i == 0) for i, t in enumerate(r.texts(private))] for r in run_rows(results)
    ]
    caption = f"Final model after round {results.get('final', {}).get('round', 0)}, on each site's test data"
    head = RUN_COLUMNS[metric_of(results)][1]
    return Table("per-site-table", caption, [*head, *(["ε"] if private else [])], rows)


# ----------------------------------------------------------------------------- a study's tables


def study_tables(doc: dict) -> tuple[Table, list[Table]]:
    """The comparison table, and the detail tables (intervals, calibration, left out, cross-site)."""
    details = [_uncertainty_table(doc, v) for v in doc["variants"]]
    details += [
        t
        for t in (
            _best_table(doc),
            _leave_one_out_table(doc),
            _cross_site_table(doc),
            _privacy_spent_table(doc),
        )
        if t is not None
    ]
    return _comparison_table(doc), details


def _sizes(doc: dict, test_set: str) -> tuple[int, int]:
    info = doc["site_info"]
    if test_set in info:
        return info[test_set]["n_train"], info[test_set]["n_test"]
    return sum(i["n_train"] for i in info.values()), sum(i["n_test"] for i in info.values())


def _comparison_table(doc: dict) -> Table:
    comp, primary, m = doc["comparison"], doc["primary"], metric_of(doc)
    local = LOCAL_OF[primary]
    head = ["site", "train", "test", *[VARIANT_LABELS.get(c, c) for c in comp["columns"]]]
    head.append(f"{VARIANT_LABELS[primary]} − {VARIANT_LABELS[local]}")
    rows = []
    for s in [*doc["sites"], "pooled"]:
        row = comp["rows"].get(s, {})
        g = comp["gains"].get(s, {}).get(f"{primary}_vs_{local}") or {}
        if g.get("difference") is None:
            gain = Cell(MISSING)
        else:
            gain = Cell(f"{g['difference']:+.3f}", _interval(g.get("ci"), "+"))
        n_train, n_test = _sizes(doc, s)
        rows.append(
            [
                Cell(s, bold=s == "pooled"),
                Cell(str(n_train)),
                Cell(str(n_test)),
                *[value_cell(row.get(c, {}).get(m), row.get(c, {}).get("ci")) for c in comp["columns"]],
                gain,
            ]
        )
    caption = (
        f"Test {METRIC_LABELS[m]} per site [95% bootstrap CI]: trained alone, federated, federated with privacy, "
        "centralized, and federated without the site. Pooled: all test data; 'local' there scores "
        "each site's data with its own model."
    )
    return Table("per-site-table", caption, head, rows)


def _uncertainty_table(doc: dict, variant: str) -> Table:
    model = doc["models"][variant]
    private, segmentation = model.get("private"), metric_of(doc) == "dice"
    if segmentation:
        head, with_ci, plain = ["site", "Dice", "HD95 (px)"], ("dice", "hd95"), ()
    else:
        head = ["site", "AUC", "sensitivity", "specificity", "balanced acc.", "ECE"]
        with_ci, plain = ("auc", "sensitivity", "specificity"), ("balanced_accuracy", "ece")
    rows = []
    for s in [*doc["sites"], "pooled"]:
        b = model["eval"].get(s, {})
        ci = b.get("ci", {})
        row = [
            Cell(s),
            *[value_cell(b.get(k), ci.get(k)) for k in with_ci],
            *[value_cell(b.get(k)) for k in plain],
        ]
        if private:
            row.append(Cell(number((model.get("epsilon") or {}).get(s), 2)))
        rows.append(row)
    head += ["ε"] if private else []
    what = "mean Dice and HD95 over the test images" if segmentation else "metrics"
    calibration = "" if segmentation else " and expected calibration error"
    caption = f"{VARIANT_LABELS[variant]} model: {what} with 95% bootstrap CIs{calibration}"
    return Table(f"{variant}-uncertainty-table", caption, head, rows)


def _best_table(doc: dict) -> Table | None:
    """Each site's model, chosen on its validation images, with every candidate's validation metric."""
    best = doc.get("best_for_site") or {}
    if not best:
        return None
    m = metric_of(doc)
    name = METRIC_LABELS[m]

    def candidates(b: dict) -> str:
        ce = b.get("validation_cross_entropy") or {}
        return ", ".join(f"{model_label(k)} {v:.3f}" + (f" (cross-entropy {ce[k]:.3f})" if k in ce else "")
                         for k, v in b["validation"].items())  # fmt: skip

    rows = [[Cell(site), Cell(model_label(b["model"]), bold=True), value_cell(b["validation"][b["model"]]),
             value_cell(b.get("test")), Cell(candidates(b))]
            for site, b in best.items()]  # fmt: skip
    chosen = doc.get("chosen_pooled") or {}
    if chosen.get(m) is not None:
        rows.append([Cell("pooled", bold=True), Cell("each site's own"), Cell(MISSING),
                     value_cell(chosen[m], chosen.get("ci")), Cell(MISSING)])  # fmt: skip
    head = ["site", "its model", f"validation {name}", f"test {name}", f"every candidate's validation {name}"]
    with_cross_entropy = any("validation_cross_entropy" in b for b in best.values())
    caption = "The model for each site, chosen on its validation images" + (
        " (equal AUCs: the lower validation cross-entropy)" if with_cross_entropy else ""
    )
    return Table("best-model-table", caption, head, rows)


def _leave_one_out_table(doc: dict) -> Table | None:
    loo = [m for m in doc["models"].values() if m["kind"] == Variant.LEAVE_ONE_OUT]
    if not loo:
        return None
    primary, metric = doc["primary"], metric_of(doc)
    rows = []
    for m in loo:
        s = m["held_out"]
        b = m["eval"].get(s, {})
        own = doc["comparison"]["rows"].get(s, {})
        rows.append(
            [
                Cell(s),
                Cell(", ".join(m["nodes"])),
                value_cell(b.get(metric), b.get("ci", {}).get(metric)),
                value_cell(own.get(primary, {}).get(metric)),
                value_cell(own.get(LOCAL_OF[primary], {}).get(metric)),
            ]
        )
    name = METRIC_LABELS[metric]
    head = ["left out", "federation (its nodes)", f"{name} on the left-out site", f"{name} with it federated"]
    return Table(
        "leave-one-out-table",
        "A hospital that never took part: the model federated without it, on its test data",
        [*head, f"{name} alone"],
        rows,
    )


def _cross_site_table(doc: dict) -> Table | None:
    cs = doc.get("cross_site", {})
    if not cs.get("rows"):
        return None
    rows = [
        [Cell(model_label(k)), *[value_cell(v, ci) for v, ci in zip(vals, cis, strict=True)]]
        for k, vals, cis in zip(cs["rows"], cs[metric_of(doc)], cs["ci"], strict=True)
    ]
    caption = f"Cross-site {METRIC_LABELS[metric_of(doc)]} [95% CI]"
    return Table("cross-site-table", caption, ["model", *cs["columns"]], rows)


def _privacy_spent_table(doc: dict) -> Table:
    """What the study spent of each site's privacy budget (every run's ledger lines composed), or
    that a study over simulated data kept fresh ledgers per run."""
    spent = doc.get("privacy_spent")
    head = ["site", "this study's epsilon", "site's total epsilon", "site's budget (max_epsilon)", "delta"]
    if not spent:
        caption = (
            "Privacy spent: simulated data (synthetic or MedMNIST partitions): each run kept fresh ledgers"
        )
        return Table("privacy-spent-table", caption, head, [])
    rows = [  # an epsilon may be the word "unbounded" (a run trained the images without DP)
        [Cell(site), Cell(number(s["study_epsilon"], 2)), Cell(number(s["site_total_epsilon"], 2)),
         Cell(number(s["max_epsilon"], 2)), Cell(f"{s['delta']:g}")]
        for site, s in spent.items()
    ]  # fmt: skip
    caption = "Privacy spent on each site's images by the whole study, every run composed, in the site's real ledger"
    return Table("privacy-spent-table", caption, head, rows)
