"""The report's summary in words: which sites gain from federating, which do not, and the references.

`plain_summary(doc)` is a few sentences built from the numbers of study.json (or of a plain run's
results.json) alone, so a rebuilt report says the same as its tables; `fedward study` also stores them
in study.json's "summary" and prints them.
"""

from __future__ import annotations

from common.privacy import epsilon_text, epsilon_value
from server.report.doc import METRIC_LABELS, is_study, is_validation, metric_of, model_label, score_text
from server.report.validation import validation_summary
from server.run_folder import LOCAL_OF, Variant


def _pts(x: float, doc: dict) -> str:
    return f"{abs(x) * 100:.1f} {METRIC_LABELS[metric_of(doc)]} points"


def plain_summary(doc: dict) -> list[str]:
    """A few sentences: which sites gain from federating and which do not, and the references."""
    if is_validation(doc):
        return validation_summary(doc)
    if not is_study(doc):
        return simulate_summary(doc)
    kind = "the federated model" + (" (with privacy)" if doc["primary"] == Variant.FEDERATED_DP else "")
    verdicts = [v for s in doc["sites"] if (v := _site_verdict(doc, s, kind)) is not None]
    gainers = [site for site, verdict, _ in verdicts if verdict == "gain"]
    losers = [site for site, verdict, _ in verdicts if verdict == "loss"]
    lines = [line for _, _, line in verdicts]
    lines += _pooled_lines(doc, kind) + _leave_one_out_lines(doc) + _worst_site_lines(doc) + _best_lines(doc)
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


def _site_verdict(doc: dict, site: str, kind: str) -> tuple[str, str, str] | None:
    """(site, "gain" | "loss" | "unclear", the sentence) from the paired difference federated - alone."""
    m, name = metric_of(doc), METRIC_LABELS[metric_of(doc)]
    rows, primary = doc["comparison"]["rows"], doc["primary"]
    local = LOCAL_OF[primary]
    g = doc["comparison"]["gains"].get(site, {}).get(f"{primary}_vs_{local}")
    if not g or g.get("difference") is None:
        return None
    d, ci = g["difference"], g.get("ci") or [None, None]
    fed_auc = score_text(rows.get(site, {}).get(primary, {}).get(m))
    loc_auc = score_text(rows.get(site, {}).get(local, {}).get(m))
    interval = f"95% CI {ci[0]:+.3f} to {ci[1]:+.3f}" if ci[0] is not None else "no interval"
    if ci[0] is not None and ci[0] > 0:
        return (
            site,
            "gain",
            f"{site} gains from federating: {name} {fed_auc} with {kind} against {loc_auc} "
            f"trained alone ({d:+.3f}, {interval}).",
        )
    if ci[1] is not None and ci[1] < 0:
        return (
            site,
            "loss",
            f"{site} does better alone: {name} {loc_auc} trained alone against {fed_auc} with "
            f"{kind} ({d:+.3f}, {interval}).",
        )
    lean = "slightly better than" if d >= 5e-4 else "slightly worse than" if d <= -5e-4 else "as good as"
    return (
        site,
        "unclear",
        f"{site}: no clear difference; {kind} is {lean} training alone "
        f"({name} {fed_auc} against {loc_auc}, {d:+.3f}, {interval} includes 0).",
    )


def _pooled_lines(doc: dict, kind: str) -> list[str]:
    """On all test data: the primary federation against centralized training, and what privacy costs."""
    m, name = metric_of(doc), METRIC_LABELS[metric_of(doc)]
    pooled, primary, lines = doc["comparison"]["rows"].get("pooled", {}), doc["primary"], []
    f = pooled.get(primary, {}).get(m)
    c = pooled.get(Variant.CENTRALIZED, {}).get(m)
    if f is not None and c is not None:
        rel = "above" if f > c else "below"
        lines.append(
            f"On all test data together, {kind} reaches {name} {score_text(f)}, {_pts(f - c, doc)} {rel} "
            f"centralized training on the pooled data ({score_text(c)}), which federation avoids."
        )
        lines += _pairs_line(
            pooled.get(primary, {}).get("auc_parts"), pooled[Variant.CENTRALIZED].get("auc_parts")
        )
    f = pooled.get(Variant.FEDERATED, {}).get(m)
    p = pooled.get(Variant.FEDERATED_DP, {}).get(m)
    if f is not None and p is not None:
        epsilon = doc["models"].get(Variant.FEDERATED_DP, {}).get("epsilon") or {}
        eps = [epsilon_value(e) for e in epsilon.values() if e is not None]
        effect = f"costs {_pts(f - p, doc)} of" if f >= p else f"adds {_pts(p - f, doc)} to"
        lines.append(
            f"Privacy {effect} pooled {name} ({score_text(p)} with privacy, {score_text(f)} without)"
            + (f" at epsilon up to {epsilon_text(max(eps))} per site." if eps else ".")
        )
    return lines


def _pairs_line(fed: dict | None, central: dict | None) -> list[str]:
    """Where the pooled AUCs differ: pairs of one site's images, or of two sites' (common.metrics)."""
    if not fed or not central:
        return []
    return [
        f"Of the pooled AUC's (positive, negative) pairs, {fed['across_share'] * 100:.0f}% join images of "
        f"two sites: there the federated model ranks {score_text(fed['across_sites'])} of them right and "
        f"centralized training {score_text(central['across_sites'])}; within a site "
        f"{score_text(fed['within_sites'])} and {score_text(central['within_sites'])} (pairs across sites "
        "reward scores that are comparable from site to site, and a model that has learnt which site "
        "sees more positives)."
    ]


def _best_lines(doc: dict) -> list[str]:
    best = doc.get("best_for_site") or {}
    if not best:
        return []
    m, name = metric_of(doc), METRIC_LABELS[metric_of(doc)]
    parts = [f"{s}: {model_label(b['model'], at_site=s)} (validation {name} {score_text(b['validation'][b['model']])}, "
             f"test {score_text(b.get('test'))})" for s, b in best.items()]  # fmt: skip
    chosen = doc.get("chosen_pooled") or {}
    together = (
        f" All test data together, each site's scored by its chosen model: {name} {score_text(chosen[m])}."
        if chosen.get(m) is not None
        else ""
    )
    return [
        f"Each site's best model on its own validation images ({m} there, never the test images): "
        + "; ".join(parts)
        + "."
        + together
    ]


def _leave_one_out_lines(doc: dict) -> list[str]:
    m, name = metric_of(doc), METRIC_LABELS[metric_of(doc)]
    rows = doc["comparison"]["rows"]
    loo = [(s, rows.get(s, {}).get(Variant.LEAVE_ONE_OUT, {}).get(m)) for s in doc["sites"]]
    loo = [(s, a) for s, a in loo if a is not None]
    if not loo:
        return []
    worst = min(loo, key=lambda t: t[1])
    parts = ", ".join(f"{s} {score_text(a)}" for s, a in loo)
    return [
        f"On a hospital that never took part (federated without it, tested on it), {name} is: {parts}; "
        f"the hardest to reach is {worst[0]}."
    ]


def _worst_site_lines(doc: dict) -> list[str]:
    m, name = metric_of(doc), METRIC_LABELS[metric_of(doc)]
    rows, primary = doc["comparison"]["rows"], doc["primary"]
    fed_sites = [(s, rows.get(s, {}).get(primary, {}).get(m)) for s in doc["sites"]]
    fed_sites = [(s, a) for s, a in fed_sites if a is not None]
    pooled = rows.get("pooled", {}).get(primary, {}).get(m)
    if not fed_sites or pooled is None:
        return []
    s, a = min(fed_sites, key=lambda t: t[1])
    gap = pooled - a
    side = "below" if gap >= 0 else "above"
    return [
        f"The worst site under federation is {s} ({name} {score_text(a)}), {_pts(gap, doc)} {side} the pooled {name}."
    ]


def simulate_summary(results: dict) -> list[str]:
    """The summary of one federated run (a `fedward simulate` folder): pooled AUC (Dice), best and worst site."""
    final = results.get("final", {})
    m, name = metric_of(results), METRIC_LABELS[metric_of(results)]
    sites = {s: b.get(m) for s, b in final.get("sites", {}).items() if b.get(m) is not None}
    lines = [
        f"A federated run of {final.get('round', 0)} rounds over {len(final.get('sites', {}))} sites "
        f"({results.get('status')}): pooled test {name} {score_text(final.get('pooled', {}).get(m))}."
    ]
    if sites:
        best, worst = max(sites, key=sites.get), min(sites, key=sites.get)
        lines.append(
            f"Best site {best} ({name} {score_text(sites[best])}), worst site {worst} "
            f"({name} {score_text(sites[worst])})."
        )
    if results.get("stop_reason"):
        lines.append(f"The run stopped early: {results['stop_reason']}")
    lines.append(
        "This folder holds one federated run only; `fedward study` adds local-only, centralized and "
        "leave-one-site-out training, ROC curves, intervals and the cross-site matrix."
    )
    return lines
