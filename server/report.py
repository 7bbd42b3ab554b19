"""`fedward report DIR`: report.html and the plots, rebuilt from a run folder's JSON alone.

    fedward report runs/study-demo     # a `fedward study` folder (study.json)
    fedward report runs/demo           # a `fedward simulate` folder (results.json only)

Writes into DIR: auc_by_round.png, epsilon_by_round.png (when privacy was on), and for a study also
roc_curves.png, cross_site.png and comparison.png; then report.html, one self-contained file with the
plots embedded (no scripts, no external files), the per-site tables and a plain-language summary.
Nothing is recomputed from models or data: every number comes from study.json / results.json.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: plots are files

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STUDY_FILE, RESULTS_FILE, REPORT_FILE = "study.json", "results.json", "report.html"
LABELS = {
    "local": "local only",
    "local-dp": "local only, DP",
    "federated": "federated",
    "federated-dp": "federated, DP",
    "centralized": "centralized",
    "leave-one-out": "left out of the federation",
}
LOCAL_OF = {"federated": "local", "federated-dp": "local-dp"}
DPI = 110


class ReportError(ValueError):
    """The folder holds no run a report can be built from: the message names it."""


# ----------------------------------------------------------------------------- reading


def load_run(run_dir: str | Path) -> dict:
    """study.json when DIR holds a study, else results.json of a plain federated run."""
    d = Path(run_dir)
    for name in (STUDY_FILE, RESULTS_FILE):
        path = d / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ReportError(f"'{path}' is not valid JSON ({err}); was the run interrupted?") from err
            if name == RESULTS_FILE and "rounds" not in doc:
                raise ReportError(f"'{path}' is not a fedward results.json (it has no 'rounds').")
            return doc
    raise ReportError(
        f"'{d}' holds neither {STUDY_FILE} nor {RESULTS_FILE}: give the --out folder of a "
        f"`fedward study` or `fedward simulate` run."
    )


def is_study(doc: dict) -> bool:
    return doc.get("kind") == "fedward-study"


def federated_runs(doc: dict) -> dict[str, dict]:
    """{name: results.json dict} of the federated runs in a study, or the one run of a simulate folder."""
    if not is_study(doc):
        private = bool(doc.get("study", {}).get("privacy", {}).get("enabled"))
        return {"federated-dp" if private else "federated": doc}
    return {v: doc["models"][v]["results"] for v in doc["variants"] if v in doc["models"]}


def _site_names(doc: dict) -> list[str]:
    if is_study(doc):
        return list(doc["sites"])
    names: list[str] = []
    for block in [doc.get("initial", {}), *doc.get("rounds", [])]:
        names += [s for s in block.get("sites", {}) if s not in names]
    return names


# ----------------------------------------------------------------------------- summary in words


def _pts(x: float) -> str:
    return f"{abs(x) * 100:.1f} AUC points"


def _auc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plain_summary(doc: dict) -> list[str]:
    """A few sentences: which sites gain from federating and which do not, and the references."""
    if not is_study(doc):
        return _simulate_summary(doc)
    lines: list[str] = []
    rows, gains = doc["comparison"]["rows"], doc["comparison"]["gains"]
    primary = doc["primary"]
    local = LOCAL_OF[primary]
    key = f"{primary}_vs_{local}"
    kind = "the federated model" + (" (with privacy)" if primary == "federated-dp" else "")
    gainers, losers, unclear = [], [], []
    for s in doc["sites"]:
        g = gains.get(s, {}).get(key)
        if not g or g.get("difference") is None:
            continue
        d, ci = g["difference"], g.get("ci") or [None, None]
        fed_auc, loc_auc = rows[s][primary]["auc"], rows[s][local]["auc"]
        interval = f"95% CI {ci[0]:+.3f} to {ci[1]:+.3f}" if ci[0] is not None else "no interval"
        if ci[0] is not None and ci[0] > 0:
            gainers.append(s)
            lines.append(
                f"{s} gains from federating: AUC {_auc(fed_auc)} with {kind} against {_auc(loc_auc)} "
                f"trained alone ({d:+.3f}, {interval})."
            )
        elif ci[1] is not None and ci[1] < 0:
            losers.append(s)
            lines.append(
                f"{s} does better alone: AUC {_auc(loc_auc)} trained alone against {_auc(fed_auc)} with "
                f"{kind} ({d:+.3f}, {interval})."
            )
        else:
            unclear.append(s)
            lean = (
                "slightly better than" if d >= 5e-4 else "slightly worse than" if d <= -5e-4 else "as good as"
            )
            lines.append(
                f"{s}: no clear difference; {kind} is {lean} training alone "
                f"(AUC {_auc(fed_auc)} against {_auc(loc_auc)}, {d:+.3f}, {interval} includes 0)."
            )
    pooled = rows.get("pooled", {})
    if primary in pooled and "centralized" in pooled:
        f, c = pooled[primary]["auc"], pooled["centralized"]["auc"]
        if f is not None and c is not None:
            rel = "above" if f > c else "below"
            lines.append(
                f"On all test data together, {kind} reaches AUC {_auc(f)}, {_pts(f - c)} {rel} "
                f"centralized training on the pooled data ({_auc(c)}), which federation avoids."
            )
    if "federated" in pooled and "federated-dp" in pooled:
        f, p = pooled["federated"]["auc"], pooled["federated-dp"]["auc"]
        eps = [e for e in (doc["models"]["federated-dp"].get("epsilon") or {}).values() if e is not None]
        if f is not None and p is not None:
            effect = f"costs {_pts(f - p)} of" if f >= p else f"adds {_pts(p - f)} to"
            lines.append(
                f"Privacy {effect} pooled AUC ({_auc(p)} with privacy, {_auc(f)} without)"
                + (f" at epsilon up to {max(eps):.2f} per site." if eps else ".")
            )
    loo = [(s, rows[s].get("leave-one-out", {}).get("auc")) for s in doc["sites"]]
    loo = [(s, a) for s, a in loo if a is not None]
    if loo:
        worst = min(loo, key=lambda t: t[1])
        parts = ", ".join(f"{s} {_auc(a)}" for s, a in loo)
        lines.append(
            f"On a hospital that never took part (federated without it, tested on it), AUC is: {parts}; "
            f"the hardest to reach is {worst[0]}."
        )
    fed_sites = [(s, rows[s].get(primary, {}).get("auc")) for s in doc["sites"]]
    fed_sites = [(s, a) for s, a in fed_sites if a is not None]
    if fed_sites and pooled.get(primary, {}).get("auc") is not None:
        s, a = min(fed_sites, key=lambda t: t[1])
        gap = pooled[primary]["auc"] - a
        side = "below" if gap >= 0 else "above"
        lines.append(
            f"The worst site under federation is {s} (AUC {_auc(a)}), {_pts(gap)} {side} the pooled AUC."
        )
    if gainers and not losers:
        lines.insert(
            0,
            f"Federating helps {len(gainers)} of {len(doc['sites'])} sites clearly; none does better alone.",
        )
    elif losers:
        lines.insert(
            0,
            f"{len(gainers)} site(s) gain clearly from federating; {', '.join(losers)} "
            f"{'does' if len(losers) == 1 else 'do'} better alone.",
        )
    return lines


def _simulate_summary(results: dict) -> list[str]:
    final = results.get("final", {})
    sites = {s: m.get("auc") for s, m in final.get("sites", {}).items() if m.get("auc") is not None}
    lines = [
        f"A federated run of {final.get('round', 0)} rounds over {len(final.get('sites', {}))} sites "
        f"({results.get('status')}): pooled test AUC {_auc(final.get('pooled', {}).get('auc'))}."
    ]
    if sites:
        best, worst = max(sites, key=sites.get), min(sites, key=sites.get)
        lines.append(
            f"Best site {best} (AUC {_auc(sites[best])}), worst site {worst} (AUC {_auc(sites[worst])})."
        )
    if results.get("stop_reason"):
        lines.append(f"The run stopped early: {results['stop_reason']}")
    lines.append(
        "This folder holds one federated run only; `fedward study` adds local-only, centralized and "
        "leave-one-site-out training, ROC curves, intervals and the cross-site matrix."
    )
    return lines


# ----------------------------------------------------------------------------- plots


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = matplotlib.colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(names)}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def plot_auc_by_round(doc: dict, path: Path) -> Path | None:
    runs = federated_runs(doc)
    names = _site_names(doc)
    if not any(r.get("rounds") for r in runs.values()):
        return None
    colors = _colors(names)
    fig = Figure(figsize=(5.2 * len(runs), 3.8))
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (label, res) in zip(axes, runs.items(), strict=True):
        blocks = ([res["initial"]] if res.get("initial") else []) + res.get("rounds", [])
        xs = [b.get("round", 0) for b in blocks]
        for s in names:
            ys = [b.get("sites", {}).get(s, {}).get("auc") for b in blocks]
            ax.plot(
                xs, [math.nan if y is None else y for y in ys], marker="o", ms=3, color=colors[s], label=s
            )
        ys = [b.get("pooled", {}).get("auc") for b in blocks]
        ax.plot(xs, [math.nan if y is None else y for y in ys], color="black", lw=2.2, label="pooled")
        ax.set_title(LABELS.get(label, label))
        ax.set_xlabel("round (0 = initial model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test AUC at each site")
    axes[-1].legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_epsilon_by_round(doc: dict, path: Path) -> Path | None:
    runs = {
        k: v for k, v in federated_runs(doc).items() if v.get("study", {}).get("privacy", {}).get("enabled")
    }
    if not runs:
        return None
    res = next(iter(runs.values()))
    names = _site_names(doc)
    colors = _colors(names)
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    rounds = res.get("rounds", [])
    for s in names:
        ys = [r.get("sites", {}).get(s, {}).get("epsilon") for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(
                [r["round"] for r in rounds],
                [math.nan if y is None else y for y in ys],
                marker="o",
                ms=3,
                color=colors[s],
                label=f"{s} (federated)",
            )
    if is_study(doc):
        for s in names:
            local = doc["models"].get(f"local-dp:{s}", {})
            ys = local.get("epsilon_by_round") or []
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, ls=":", color=colors[s], label=f"{s} (alone)")
    target = res.get("study", {}).get("privacy", {}).get("target_epsilon")
    if target:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target ε = {target:g}")
    ax.set_xlabel("round (alone: the same epochs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ε spent so far (whole ledger)")
    ax.set_title("privacy spent per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _roc_curves(doc: dict, test_set: str) -> list[tuple[str, dict, float | None]]:
    models, out = doc["models"], []
    for key in ("federated", "federated-dp", "centralized"):
        block = models.get(key, {}).get("eval", {}).get(test_set, {})
        if block.get("roc"):
            out.append((LABELS[key], block["roc"], block.get("auc")))
    if test_set != "pooled":
        for kind in ("local", "local-dp", "leave-one-out"):
            block = models.get(f"{kind}:{test_set}", {}).get("eval", {}).get(test_set, {})
            if block.get("roc"):
                out.append((LABELS[kind], block["roc"], block.get("auc")))
    return out


def plot_roc_curves(doc: dict, path: Path) -> Path | None:
    if not is_study(doc):
        return None
    panels = [*doc["sites"], "pooled"]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    styles = {
        LABELS["federated"]: ("tab:blue", "-"),
        LABELS["federated-dp"]: ("tab:purple", "-"),
        LABELS["centralized"]: ("black", "--"),
        LABELS["local"]: ("tab:orange", "-"),
        LABELS["local-dp"]: ("tab:brown", ":"),
        LABELS["leave-one-out"]: ("tab:red", "-."),
    }
    for ax, name in zip(axes, panels, strict=False):
        for label, roc, auc in _roc_curves(doc, name):
            color, ls = styles.get(label, ("grey", "-"))
            ax.plot(roc["fpr"], roc["tpr"], color=color, ls=ls, lw=1.6, label=f"{label} {_auc(auc)}")
        ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)
        ax.set_title(f"{name} test data" if name != "pooled" else "all test data (pooled)")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7, title="model: AUC", title_fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("ROC curves of the final models")
    return _save(fig, path)


def plot_cross_site(doc: dict, path: Path) -> Path | None:
    if not is_study(doc) or not doc.get("cross_site", {}).get("rows"):
        return None
    cs = doc["cross_site"]
    values = [[math.nan if v is None else v for v in row] for row in cs["auc"]]
    finite = [v for row in values for v in row if not math.isnan(v)]
    fig = Figure(figsize=(1.3 * len(cs["columns"]) + 3.2, 0.48 * len(cs["rows"]) + 1.8))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(values, cmap=cmap, vmin=min([0.5, *finite]), vmax=1.0, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(
                    j,
                    i,
                    f"{v:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.8 else "black",
                )
    ax.set_xticks(range(len(cs["columns"])), cs["columns"], rotation=20, ha="right")
    ax.set_yticks(range(len(cs["rows"])), [_row_label(r) for r in cs["rows"]])
    ax.set_xlabel("test data of")
    ax.set_ylabel("model trained")
    ax.set_title("cross-site AUC: each model on each site's test data")
    fig.colorbar(image, ax=ax, label="AUC")
    return _save(fig, path)


def _row_label(key: str) -> str:
    if ":" in key:
        kind, site = key.split(":", 1)
        return f"{site} alone" + (", DP" if kind == "local-dp" else "")
    return LABELS.get(key, key)


def plot_comparison(doc: dict, path: Path) -> Path | None:
    if not is_study(doc):
        return None
    comp = doc["comparison"]
    sets = [*doc["sites"], "pooled"]
    columns = comp["columns"]
    fig = Figure(figsize=(1.9 * len(sets) + 3, 4.0))
    ax = fig.subplots()
    width = 0.8 / max(len(columns), 1)
    cmap = matplotlib.colormaps["tab10"]
    lows = []
    for k, c in enumerate(columns):
        xs, ys, err = [], [], [[], []]
        for i, s in enumerate(sets):
            cell = comp["rows"].get(s, {}).get(c)
            if not cell or cell.get("auc") is None:
                continue
            xs.append(i + (k - (len(columns) - 1) / 2) * width)
            ys.append(cell["auc"])
            ci = cell.get("ci") or [cell["auc"], cell["auc"]]
            err[0].append(max(cell["auc"] - ci[0], 0))
            err[1].append(max(ci[1] - cell["auc"], 0))
            lows.append(ci[0])
        if xs:
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=cmap(k % 10), label=LABELS.get(c, c))
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(max(0.0, min([0.5, *lows]) - 0.05), 1.0)
    ax.set_ylabel("test AUC (95% CI)")
    ax.set_title("local, federated and centralized, per site")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


PLOTS = (
    ("auc_by_round.png", plot_auc_by_round, "Test AUC at each site after every round"),
    ("epsilon_by_round.png", plot_epsilon_by_round, "Privacy spent (epsilon) per site by round"),
    ("roc_curves.png", plot_roc_curves, "ROC curves per site for the final models"),
    ("cross_site.png", plot_cross_site, "Cross-site matrix: every model on every site's test data"),
    ("comparison.png", plot_comparison, "Local, federated and centralized AUC per site, with 95% CIs"),
)


# ----------------------------------------------------------------------------- HTML


def _e(x) -> str:
    return html.escape(str(x))


def _ci(ci) -> str:
    return f" <span class=ci>[{ci[0]:.3f}–{ci[1]:.3f}]</span>" if ci else ""


def _cell(value, ci=None) -> str:
    return "–" if value is None else f"{value:.3f}{_ci(ci)}"


def _table(table_id: str, caption: str, head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><caption>{_e(caption)}</caption><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _study_tables(doc: dict) -> tuple[str, str]:
    """The comparison table, and the detail tables (intervals, calibration, left out, cross-site)."""
    comp, info = doc["comparison"], doc["site_info"]
    primary = doc["primary"]
    gain_key = f"{primary}_vs_{LOCAL_OF[primary]}"
    gain_head = f"{LABELS[primary]} − {LABELS[LOCAL_OF[primary]]}"
    head = ["site", "train", "test", *[LABELS.get(c, c) for c in comp["columns"]], gain_head]
    rows = []
    for s in [*doc["sites"], "pooled"]:
        row = comp["rows"].get(s, {})
        g = comp["gains"].get(s, {}).get(gain_key) or {}
        n_train = info[s]["n_train"] if s in info else sum(i["n_train"] for i in info.values())
        n_test = info[s]["n_test"] if s in info else sum(i["n_test"] for i in info.values())
        gain = (
            "–"
            if g.get("difference") is None
            else f"{g['difference']:+.3f}"
            + (f" <span class=ci>[{g['ci'][0]:+.3f}–{g['ci'][1]:+.3f}]</span>" if g.get("ci") else "")
        )
        rows.append(
            [
                f"<b>{_e(s)}</b>" if s == "pooled" else _e(s),
                str(n_train),
                str(n_test),
                *[_cell(row.get(c, {}).get("auc"), row.get(c, {}).get("ci")) for c in comp["columns"]],
                gain,
            ]
        )
    out = [
        _table(
            "per-site-table",
            "Test AUC per site [95% bootstrap CI]: trained alone, federated, federated with privacy, "
            "centralized, and federated without the site. Pooled: all test data; 'local' there scores "
            "each site's data with its own model.",
            head,
            rows,
        )
    ]
    for v in doc["variants"]:
        m = doc["models"][v]
        private = m.get("private")
        head = ["site", "AUC", "sensitivity", "specificity", "balanced acc.", "ECE"] + (
            ["ε"] if private else []
        )
        rows = []
        for s in [*doc["sites"], "pooled"]:
            b = m["eval"].get(s, {})
            ci = b.get("ci", {})
            eps = (m.get("epsilon") or {}).get(s)
            rows.append(
                [
                    _e(s),
                    _cell(b.get("auc"), ci.get("auc")),
                    _cell(b.get("sensitivity"), ci.get("sensitivity")),
                    _cell(b.get("specificity"), ci.get("specificity")),
                    _cell(b.get("balanced_accuracy")),
                    _cell(b.get("ece")),
                    *([("–" if eps is None else f"{eps:.2f}")] if private else []),
                ]
            )
        out.append(
            _table(
                f"{v}-uncertainty-table",
                f"{LABELS[v]} model: metrics with 95% bootstrap CIs and expected calibration error",
                head,
                rows,
            )
        )
    loo = [m for m in doc["models"].values() if m["kind"] == "leave-one-out"]
    if loo:
        rows = []
        for m in loo:
            s = m["held_out"]
            b = m["eval"].get(s, {})
            own = doc["comparison"]["rows"].get(s, {})
            rows.append(
                [
                    _e(s),
                    _e(", ".join(m["nodes"])),
                    _cell(b.get("auc"), b.get("ci", {}).get("auc")),
                    _cell(own.get(primary, {}).get("auc")),
                    _cell(own.get(LOCAL_OF[primary], {}).get("auc")),
                ]
            )
        out.append(
            _table(
                "leave-one-out-table",
                "A hospital that never took part: the model federated without it, on its test data",
                [
                    "left out",
                    "federation (its nodes)",
                    "AUC on the left-out site",
                    "AUC with it federated",
                    "AUC alone",
                ],
                rows,
            )
        )
    cs = doc.get("cross_site", {})
    if cs.get("rows"):
        rows = [
            [_e(_row_label(k)), *[_cell(v, ci) for v, ci in zip(vals, cis, strict=True)]]
            for k, vals, cis in zip(cs["rows"], cs["auc"], cs["ci"], strict=True)
        ]
        out.append(_table("cross-site-table", "Cross-site AUC [95% CI]", ["model", *cs["columns"]], rows))
    return out[0], "\n".join(out[1:])


def _simulate_tables(results: dict) -> tuple[str, str]:
    final, initial = results.get("final", {}), results.get("initial", {})
    private = bool(results.get("study", {}).get("privacy", {}).get("enabled"))
    head = ["site", "test", "AUC 0", "AUC", "accuracy", "sensitivity", "specificity", "balanced acc."]
    head += ["ε"] if private else []
    rows = []
    for s, m in [*final.get("sites", {}).items(), ("pooled", final.get("pooled", {}))]:
        init = (initial.get("pooled") if s == "pooled" else initial.get("sites", {}).get(s)) or {}
        eps = m.get("epsilon")
        rows.append(
            [
                f"<b>{_e(s)}</b>" if s == "pooled" else _e(s),
                str(m.get("n_test", "–")),
                _cell(init.get("auc")),
                *[
                    _cell(m.get(k))
                    for k in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
                ],
                *(
                    [("–" if eps is None else f"{eps:.2f}")]
                    if private and s != "pooled"
                    else [""]
                    if private
                    else []
                ),
            ]
        )
    caption = f"Final model after round {final.get('round', 0)}, on each site's test data"
    return _table("per-site-table", caption, head, rows), ""


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0 2rem; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.4rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
th { background: #f4f4f4; } .ci { color: #777; font-size: 0.8rem; white-space: nowrap; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
#summary li { margin-bottom: 0.3rem; }
"""


def render_html(doc: dict, plots: list[tuple[str, str, Path]]) -> str:
    study = doc.get("study", {})
    if is_study(doc):
        kind = "study"
        meta = (
            f"{len(doc['sites'])} sites, {study.get('rounds')} rounds x {study.get('train', {}).get('local_epochs')} "
            f"local epochs, model {study.get('model', {}).get('name')}; intervals: "
            f"{doc['settings']['bootstrap_samples']} stratified bootstrap resamples; status {doc['status']}"
        )
        table, details = _study_tables(doc)
    else:
        kind = "federated run"
        meta = (
            f"{len(doc.get('final', {}).get('sites', {}))} sites, {doc.get('final', {}).get('round', 0)} rounds, "
            f"model {study.get('model', {}).get('name')}, strategy {study.get('strategy', {}).get('name')}; "
            f"status {doc.get('status')}"
        )
        table, details = _simulate_tables(doc)
    summary = plain_summary(doc)  # from the numbers, so a rebuilt report says the same as its tables
    figures = []
    for name, caption, path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(
            f'<figure id="fig-{_e(Path(name).stem)}"><img alt="{_e(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)} ({_e(name)})</figcaption></figure>'
        )
    items = "".join(f"<li>{_e(line)}</li>" for line in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedward {kind}: {_e(study.get("name", ""))}</title>
<style>{CSS}</style></head>
<body>
<h1>fedward {kind}: {_e(study.get("name", ""))}</h1>
<p class="meta">{_e(meta)}</p>
<section id="summary"><h2>Summary</h2><ul>{items}</ul></section>
<section id="tables"><h2>Per site</h2>
{table}
</section>
<section id="plots"><h2>Plots</h2>
{"".join(figures)}
</section>
{f'<section id="details"><h2>Details</h2>{details}</section>' if details else ""}
</body></html>
"""


def build_report(run_dir: str | Path) -> Path:
    """Write the plots and report.html into `run_dir` from its JSON; returns the report's path."""
    d = Path(run_dir)
    doc = load_run(d)
    plots = []
    for name, fn, caption in PLOTS:
        path = fn(doc, d / name)
        if path is not None:
            plots.append((name, caption, path))
    report = d / REPORT_FILE
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(render_html(doc, plots), encoding="utf-8")
    tmp.replace(report)
    return report


# ----------------------------------------------------------------------------- command line


def cli(args: argparse.Namespace, console=None) -> int:
    """`fedward report DIR`: 0 when written, 2 when DIR holds no run."""
    try:
        path = build_report(args.dir)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = [p.name for p in sorted(Path(args.dir).glob("*.png"))]
    print(f"report: {path}   plots: {', '.join(written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m server.report DIR`: the same as `fedward report DIR`."""
    from server.cli import main as fedward

    return fedward(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
