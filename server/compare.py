"""`fedward compare OLD NEW`: may the NEW model replace the OLD one? Over validation results only.

    fedward compare runs/validate-old runs/validate-new       # two validations of one package each
    fedward compare runs/validate runs/validate               # one validation of two: first old, second new
    fedward compare runs/validate runs/validate --old-package 1 --new-package 3

Per site (and pooled): the AUC difference NEW - OLD with a 95% interval. A site's releases are per
model (no site lets out both models' scores of the same images together), so the interval combines
the two releases' own 95% AUC intervals as independent: wider than a paired interval on the same
images would be (the two AUCs are positively correlated there), so "significantly worse" is said only
when it is clearly so. The verdict is "promote" only when no site is significantly worse, every site
that evaluated OLD also evaluated NEW on the same data, and NEW is significantly better pooled or at
some site; otherwise "do not promote", with every reason. Exit status 0 promote, 1 do not promote,
2 the inputs cannot be compared (the message says why).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.config import ConfigError
from common.files import write_atomic
from server.run_folder import VALIDATION_FILE, VALIDATION_KIND

Z = 1.959964  # the 95% normal quantile the releases' intervals use
HELP = "may NEW replace OLD? per-site differences from two validations, and a verdict"


def read_validation(path: str | Path) -> dict:
    """validation.json of a `fedward validate` folder (or the file itself); ConfigError naming it."""
    p = Path(path)
    p = p / VALIDATION_FILE if p.is_dir() else p
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"'{p}' cannot be read as a validation ({err}); give a `fedward validate` --out folder."
        ) from err
    if not isinstance(doc, dict) or doc.get("kind") != VALIDATION_KIND:
        raise ConfigError(f"'{p}' is not a `fedward validate` {VALIDATION_FILE}.")
    return doc


def pick(doc: dict, which: str | None, default: int, source: str) -> dict:
    """One package's entry of a validation: by label or 1-based position; `default` (0-based) else."""
    entries = doc["packages"]
    if which is None:
        if len(entries) == 1:
            return entries[0]
        if default < len(entries):
            return entries[default]
        raise ConfigError(
            f"{source} validated {len(entries)} packages; say which with --old-package/--new-package."
        )
    for i, e in enumerate(entries, 1):
        if which in (e["label"], str(i), e["package"]):
            return e
    labels = ", ".join(f"{i} ({e['label']})" for i, e in enumerate(entries, 1))
    raise ConfigError(f"{source} holds no package '{which}'; it holds {labels}.")


def _se(ci: list[float] | None) -> float | None:
    return None if not ci else (ci[1] - ci[0]) / (2 * Z)


def _site(old: dict | None, new: dict | None) -> dict:
    """One site's difference, its interval and what it says."""
    if old is None or old.get("auc") is None:
        return {"verdict": "not compared", "why": "OLD has no AUC here"}
    if new is None or new.get("auc") is None:
        return {"verdict": "not comparable", "why": "NEW was not evaluated here (refused, failed or no AUC)"}
    out = {"old": old["auc"], "new": new["auc"], "difference": round(new["auc"] - old["auc"], 6)}
    if old.get("release") == new.get("release") == "exact" and old.get("n_test") != new.get("n_test"):
        return out | {"verdict": "not comparable",
                      "why": f"not the same test data ({old.get('n_test')} vs {new.get('n_test')} images)"}  # fmt: skip
    se_old, se_new = _se(old.get("auc_ci")), _se(new.get("auc_ci"))
    if se_old is None or se_new is None:
        return out | {"verdict": "not comparable", "why": "a release without an AUC interval (summary only)"}
    half = Z * math.hypot(se_old, se_new)
    d = out["difference"]
    out["ci"] = [round(d - half, 6), round(d + half, 6)]
    out["verdict"] = "worse" if out["ci"][1] < 0 else "better" if out["ci"][0] > 0 else "no clear difference"
    return out


def compare(old_doc: dict, new_doc: dict, old: dict, new: dict) -> dict:
    """The comparison of two validated packages (entries of validation docs) and its verdict."""
    if old_doc["metric"] != "auc" or new_doc["metric"] != "auc":
        raise ConfigError(
            "compare reads AUC intervals; a segmentation validation releases Dice sums without intervals, "
            "so it cannot say whether a difference is beyond chance."
        )
    sites = sorted(set(old["sites"]) | set(old["failed"]))
    rows = {s: _site(old["sites"].get(s), new["sites"].get(s)) for s in sites}
    rows["pooled"] = _site(old["pooled"], new["pooled"])
    reasons = [f"{s}: NEW is significantly worse ({r['difference']:+.3f}, 95% interval {r['ci'][0]:+.3f} to "
               f"{r['ci'][1]:+.3f})" for s, r in rows.items() if r["verdict"] == "worse"]  # fmt: skip
    reasons += [f"{s}: {r['why']}" for s, r in rows.items() if r["verdict"] == "not comparable"]
    better = [s for s, r in rows.items() if r["verdict"] == "better"]
    if not reasons and not better:
        reasons.append("NEW is not significantly better anywhere (every interval includes 0)")
    return {
        "old": {k: old[k] for k in ("label", "package", "sha256")},
        "new": {k: new[k] for k in ("label", "package", "sha256")},
        "sites": rows,
        "promote": not reasons,
        "reasons": reasons,
        "better_at": better,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", help="the validation (folder or validation.json) of the model in use")
    parser.add_argument("new", help="the validation of the candidate (may be the same folder)")
    parser.add_argument("--old-package", help="which package of OLD: its label or position (1, 2, ...)")
    parser.add_argument("--new-package", help="which package of NEW: its label or position")
    parser.add_argument("--out", help="also write the comparison as JSON to this file")


def run(args: argparse.Namespace, console: Console) -> int:
    old_doc, new_doc = read_validation(args.old), read_validation(args.new)
    same = Path(args.old).resolve() == Path(args.new).resolve()
    old = pick(old_doc, args.old_package, 0, args.old)
    new = pick(new_doc, args.new_package, 1 if same else 0, args.new)
    result = compare(old_doc, new_doc, old, new)
    table = Table(title=f"NEW {new['label']} against OLD {old['label']}: test AUC")
    for col in ("site", "OLD", "NEW", "NEW - OLD", "95% interval", "says"):
        table.add_column(col, justify="left" if col in ("site", "says") else "right", no_wrap=True)
    for site, r in result["sites"].items():
        ci = f"{r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}" if r.get("ci") else "-"
        cells = [f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in ("old", "new")]
        diff = f"{r['difference']:+.3f}" if r.get("difference") is not None else "-"
        table.add_row(site, *cells, diff, ci, r["verdict"] + (f": {r['why']}" if r.get("why") else ""))
    console.print(table)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2))
    if result["promote"]:
        console.print(
            f"[green]promote[/]: better at {', '.join(result['better_at'])}; worse nowhere.", highlight=False
        )
        return 0
    console.print("[red]do not promote[/]: " + "; ".join(result["reasons"]), highlight=False)
    return 1
