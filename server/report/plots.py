"""The report's plots (matplotlib, no display), each drawn from a run's document into a PNG file.

    PLOTS: (file name, function(doc, path) -> path or None, caption); name and caption name the
    run's headline metric ({metric}: auc or dice, {label}: AUC or Dice)
    VALIDATION_PLOTS: the same for a validation's report

Only what draws imports this module (`build_report`, the drift monitor's report), so that the
commands start without loading matplotlib.

A function returns None when its plot does not apply (no privacy, or a plain run without a study's
references); `server.report.build_report` writes the others into the run folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: plots are files

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.privacy import UNBOUNDED  # noqa: E402
from server.report.doc import (  # noqa: E402
    METRIC_LABELS,
    federated_runs,
    is_private,
    is_study,
    metric_of,
    model_label,
    score_text,
    sites_of,
)
from server.run_folder import FEDERATED_VARIANTS, VARIANT_LABELS, Variant, model_key  # noqa: E402

DPI = 110
ROC_STYLES = {  # the kinds of model in the ROC panels: (colour, line style)
    Variant.FEDERATED: ("tab:blue", "-"),
    Variant.FEDERATED_DP: ("tab:purple", "-"),
    Variant.CENTRALIZED: ("black", "--"),
    Variant.LOCAL: ("tab:orange", "-"),
    Variant.LOCAL_DP: ("tab:brown", ":"),
    Variant.LEAVE_ONE_OUT: ("tab:red", "-."),
}


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = matplotlib.colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(names)}


def _nan(values: list[float | str | None]) -> list[float]:
    """Numbers to plot: NaN (a gap) where none was reported, or where the file holds a word (an
    epsilon's "unbounded", which no axis shows)."""
    return [v if isinstance(v, int | float) else math.nan for v in values]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def plot_metric_by_round(doc: dict, path: Path) -> Path | None:
    """Each site's (and the pooled) AUC, or Dice for segmentation, after every round."""
    runs = federated_runs(doc)
    names, m = sites_of(doc), metric_of(doc)
    if not any(r.get("rounds") for r in runs.values()):
        return None
    colors = _colors(names)
    fig = Figure(figsize=(5.2 * len(runs), 3.8))
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (label, res) in zip(axes, runs.items(), strict=True):
        blocks = ([res["initial"]] if res.get("initial") else []) + res.get("rounds", [])
        xs = [b.get("round", 0) for b in blocks]
        for s in names:
            ys = [b.get("sites", {}).get(s, {}).get(m) for b in blocks]
            ax.plot(xs, _nan(ys), marker="o", ms=3, color=colors[s], label=s)
        ys = [b.get("pooled", {}).get(m) for b in blocks]
        ax.plot(xs, _nan(ys), color="black", lw=2.2, label="pooled")
        ax.set_title(VARIANT_LABELS.get(label, label))
        ax.set_xlabel("round (0 = initial model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {METRIC_LABELS[m]} at each site")
    axes[-1].legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_epsilon_by_round(doc: dict, path: Path) -> Path | None:
    runs = [v for v in federated_runs(doc).values() if is_private(v)]
    if not runs:
        return None
    res, names = runs[0], sites_of(doc)
    colors = _colors(names)
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    rounds = res.get("rounds", [])
    for s in names:
        ys = [r.get("sites", {}).get(s, {}).get("epsilon") for r in rounds]
        if any(y is not None for y in ys):
            xs = [r["round"] for r in rounds]
            unbounded = ", ε unbounded" if UNBOUNDED in ys else ""  # released without DP: no point to draw
            ax.plot(xs, _nan(ys), marker="o", ms=3, color=colors[s], label=f"{s} (federated{unbounded})")
    if is_study(doc):
        for s in names:
            ys = doc["models"].get(model_key(Variant.LOCAL_DP, s), {}).get("epsilon_by_round") or []
            if ys:
                unbounded = ", ε unbounded" if UNBOUNDED in ys else ""
                ax.plot(
                    range(1, len(ys) + 1), _nan(ys), ls=":", color=colors[s], label=f"{s} (alone{unbounded})"
                )
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


def _roc_curves(doc: dict, test_set: str) -> list[tuple[Variant, dict, float | None]]:
    """(kind of model, ROC points, AUC) of the final models on one test set."""
    models, out = doc["models"], []
    for kind in (*FEDERATED_VARIANTS, Variant.CENTRALIZED):
        block = models.get(kind, {}).get("eval", {}).get(test_set, {})
        if block.get("roc"):
            out.append((kind, block["roc"], block.get("auc")))
    if test_set != "pooled":
        for kind in (Variant.LOCAL, Variant.LOCAL_DP, Variant.LEAVE_ONE_OUT):
            block = models.get(model_key(kind, test_set), {}).get("eval", {}).get(test_set, {})
            if block.get("roc"):
                out.append((kind, block["roc"], block.get("auc")))
    return out


def plot_roc_curves(doc: dict, path: Path) -> Path | None:
    if not is_study(doc) or metric_of(doc) != "auc":  # segmentation has no ROC curve
        return None
    panels = [*doc["sites"], "pooled"]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, panels, strict=False):
        for kind, roc, auc in _roc_curves(doc, name):
            color, ls = ROC_STYLES[kind]
            label = f"{VARIANT_LABELS[kind]} {score_text(auc)}"
            ax.plot(roc["fpr"], roc["tpr"], color=color, ls=ls, lw=1.6, label=label)
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
    cs, m = doc["cross_site"], metric_of(doc)
    values = [_nan(row) for row in cs[m]]
    finite = [v for row in values for v in row if not math.isnan(v)]
    fig = Figure(figsize=(1.3 * len(cs["columns"]) + 3.2, 0.48 * len(cs["rows"]) + 1.8))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(values, cmap=cmap, vmin=min([0.5, *finite]), vmax=1.0, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                color = "white" if v < 0.8 else "black"
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(cs["columns"])), cs["columns"], rotation=20, ha="right")
    ax.set_yticks(range(len(cs["rows"])), [model_label(r) for r in cs["rows"]])
    ax.set_xlabel("test data of")
    ax.set_ylabel("model trained")
    ax.set_title(f"cross-site {METRIC_LABELS[m]}: each model on each site's test data")
    fig.colorbar(image, ax=ax, label=METRIC_LABELS[m])
    return _save(fig, path)


def plot_comparison(doc: dict, path: Path) -> Path | None:
    if not is_study(doc):
        return None
    comp, m = doc["comparison"], metric_of(doc)
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
            if not cell or cell.get(m) is None:
                continue
            xs.append(i + (k - (len(columns) - 1) / 2) * width)
            ys.append(cell[m])
            ci = cell.get("ci") or [cell[m], cell[m]]
            err[0].append(max(cell[m] - ci[0], 0))
            err[1].append(max(ci[1] - cell[m], 0))
            lows.append(ci[0])
        if xs:
            label = VARIANT_LABELS.get(c, c)
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=cmap(k % 10), label=label)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(max(0.0, min([0.5, *lows]) - 0.05), 1.0)
    ax.set_ylabel(f"test {METRIC_LABELS[m]} (95% CI)")
    ax.set_title("local, federated and centralized, per site")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_validation(doc: dict, path: Path) -> Path | None:
    """Bars: each package's metric at each site and pooled, with the intervals."""
    cs, metric = doc.get("cross_site") or {}, doc["metric"]
    if not cs.get("rows"):
        return None
    fig = Figure(figsize=(1.9 * len(cs["columns"]) + 3, 4.0))
    ax = fig.subplots()
    width = 0.8 / len(cs["rows"])
    for k, (label, values, cis) in enumerate(zip(cs["rows"], cs[metric], cs["ci"], strict=True)):
        xs = [i + (k - (len(cs["rows"]) - 1) / 2) * width for i in range(len(values))]
        ys = [math.nan if v is None else v for v in values]
        err = [[0 if v is None or not ci else max(v - ci[0], 0) for v, ci in zip(values, cis, strict=True)],
               [0 if v is None or not ci else max(ci[1] - v, 0) for v, ci in zip(values, cis, strict=True)]]  # fmt: skip
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(cs["columns"])), cs["columns"])
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel(f"test {METRIC_LABELS[metric]} (95% interval)")
    ax.set_title("each package at each site")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


PLOTS = (  # names and captions are formatted with the run's headline metric (auc / AUC, dice / Dice)
    ("{metric}_by_round.png", plot_metric_by_round, "Test {label} at each site after every round"),
    ("epsilon_by_round.png", plot_epsilon_by_round, "Privacy spent (epsilon) per site by round"),
    ("roc_curves.png", plot_roc_curves, "ROC curves per site for the final models"),
    ("cross_site.png", plot_cross_site, "Cross-site matrix: every model on every site's test data"),
    ("comparison.png", plot_comparison, "Local, federated and centralized {label} per site, with 95% CIs"),
)
VALIDATION_PLOTS = (
    ("validation.png", plot_validation, "Each package's {label} at each site, with 95% intervals"),
)
