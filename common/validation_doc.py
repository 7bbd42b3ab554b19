"""validation.json: what a validation of model packages writes, federated (`fedward validate`,
server.validate) or at one hospital on its own data (`fedward site validate`, client.site_validate).

    {"kind": "fedward-validation", "version": 1, "validation_id", "status", "study", "metric": "auc"|"dice",
     "sites": [...], "packages": [{"label", "package", "sha256", "study_id", ..., "sites": {site: metrics},
     "pooled": metrics, "failed": {site: why}}], "cross_site": {"rows", "columns", "metric", <metric>, "ci"}}

A site's metrics carry the headline metric's 95% interval as `<metric>_ci` (`auc_ci`, `dice_ci`).
`fedward compare` and `fedward report` read it.
"""

from __future__ import annotations

import time

VALIDATION_FILE = "validation.json"
VALIDATION_KIND = "fedward-validation"
VALIDATION_VERSION = 1


def new_validation(validation_id: str, study: dict, task: str) -> dict:
    """A validation that has evaluated nothing yet."""
    return {
        "kind": VALIDATION_KIND,
        "version": VALIDATION_VERSION,
        "validation_id": validation_id,
        "status": "running",
        "study": study,
        "metric": "dice" if task == "segmentation" else "auc",
        "sites": [],
        "packages": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish(doc: dict, status: str) -> dict:
    """The doc with its status, its sites (every site any package was evaluated or refused at) and
    the cross-site table: rows the packages, columns the sites and pooled."""
    doc["status"] = status
    doc["sites"] = sorted({s for e in doc["packages"] for s in (*e["sites"], *e["failed"])})
    metric, columns = doc["metric"], [*doc["sites"], "pooled"]

    def cell(entry: dict, site: str) -> dict:
        return entry["pooled"] if site == "pooled" else entry["sites"].get(site, {})

    doc["cross_site"] = {
        "rows": [e["label"] for e in doc["packages"]],
        "columns": columns,
        "metric": metric,
        metric: [[cell(e, c).get(metric) for c in columns] for e in doc["packages"]],
        "ci": [[cell(e, c).get(f"{metric}_ci") for c in columns] for e in doc["packages"]],
    }
    return doc
