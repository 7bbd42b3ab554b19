"""Experiment tracking in MLflow (an optional extra: `pip install -e ".[mlflow]"`).

`--mlflow [URI]` on `fedward simulate`, `study`, `validate` and `site monitor` logs the finished run
to MLflow: its parameters (the study config, flattened), per-site metrics (per round for federated
runs, with the round as MLflow's step), epsilon per site, and the run's report, JSON and model card as
artifacts. Without a URI it is a local SQLite store, `mlflow.db` in the current folder (MLflow's
own file store is in maintenance mode) with the artifacts in `mlflow-artifacts/` beside it;
MLFLOW_TRACKING_URI or a given URI (`http://...`, `sqlite:///...`) win. Metric names are
`<metric>/<site>` (`auc/hospital-a`, `epsilon/hospital-a`), prefixed by the model or package.

Tracking never stops a run: `Tracker.check()` probes the store before the run starts and, when
MLflow is not installed or the URI cannot be reached, says so once and tracks nothing; everything is
also in the run folder. The run is logged from its own JSON after it finished, so MLflow shows
exactly what the run folder holds.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from common.package import CARD_HTML, CARD_MD, PACKAGE_DIR
from server.run_folder import MONITOR_FILE, REPORT_FILE, RESULTS_FILE, STUDY_FILE, VALIDATION_FILE

log = logging.getLogger("fedward.tracking")
EXPERIMENT = "fedward"
DEFAULT = "default"  # --mlflow without a URI


def add_argument(parser) -> None:
    """`--mlflow [URI]` on a command's parser."""
    parser.add_argument("--mlflow", nargs="?", const=DEFAULT, default=None, metavar="URI",
                        help="also log the run to MLflow (default store: ./mlflow.db; needs the mlflow extra)")  # fmt: skip


def _flat(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif not isinstance(value, list) or len(value) <= 8:
        out[prefix] = value
    return out


class Tracker:
    """Logs one finished run to MLflow, or nothing when it cannot (see the module docstring)."""

    def __init__(self, uri: str | None, console=None):
        self.console = console
        if uri == DEFAULT:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.uri = uri  # None: not tracking
        self.mlflow = None

    def _say(self, text: str) -> None:
        log.warning(text)
        if self.console is not None:
            self.console.print(f"[yellow]MLflow[/]: {text}", highlight=False)

    def check(self) -> bool:
        """Is MLflow there and its store reachable? Says why not, once."""
        if self.uri is None:
            return False
        try:
            import mlflow
        except ImportError:
            self._say(
                'not installed (pip install -e ".[mlflow]"); this run is not tracked, its folder has it all'
            )
            self.uri = None
            return False
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server: fail at once
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        try:
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:  # a local store keeps its files beside it
                local = self.uri.startswith("sqlite:///")
                where = (
                    (Path(self.uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").as_uri()
                    if local
                    else None
                )
                mlflow.create_experiment(EXPERIMENT, artifact_location=where)
            mlflow.set_experiment(EXPERIMENT)
        except Exception as err:  # noqa: BLE001 - whatever the store says, the run goes on untracked
            self._say(f"{self.uri} cannot be reached ({type(err).__name__}: {str(err)[:200]}); this run is not "
                      "tracked, its folder has it all")  # fmt: skip
            self.uri = None
            return False
        self.mlflow = mlflow
        return True

    def log_run(self, kind: str, name: str, params: dict, metrics: list[tuple[str, float, int]],
                artifacts: list[Path]) -> str | None:  # fmt: skip
        """One MLflow run: tags kind and name, the parameters, (key, value, step) metrics, the files."""
        if self.mlflow is None:
            return None
        mlflow = self.mlflow
        try:
            with mlflow.start_run(run_name=name, tags={"fedward.kind": kind}) as run:
                flat = {k: str(v)[:500] for k, v in _flat("", params, {}).items()}
                keys = sorted(flat)
                for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per call
                    mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})
                for key, value, step in metrics:
                    if value is not None:
                        mlflow.log_metric(re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key), float(value), step=step)
                for path in artifacts:
                    if path.is_file():
                        mlflow.log_artifact(str(path))
                return run.info.run_id
        except Exception as err:  # noqa: BLE001 - tracking never fails the run
            self._say(f"logging to {self.uri} failed ({type(err).__name__}: {str(err)[:200]})")
            return None


def run_metrics(results: dict, prefix: str = "") -> list[tuple[str, float, int]]:
    """A federated run's per-site and pooled metrics per round (step = round) and epsilon per site."""
    metric = "dice" if results.get("study", {}).get("task") == "segmentation" else "auc"
    out = []
    for block in [results.get("initial", {}) | {"round": 0}, *results.get("rounds", [])]:
        step = int(block.get("round", 0))
        for site, m in block.get("sites", {}).items():
            out.append((f"{prefix}{metric}/{site}", m.get(metric), step))
            if isinstance(m.get("epsilon"), int | float):  # not "unbounded": MLflow's metrics are numbers
                out.append((f"{prefix}epsilon/{site}", m["epsilon"], step))
        out.append((f"{prefix}{metric}/pooled", block.get("pooled", {}).get(metric), step))
    return out


def simulate_run(tracker: Tracker, out: Path, results: dict) -> str | None:
    return tracker.log_run("simulate", results.get("study", {}).get("name", out.name), results.get("study", {}),
                           run_metrics(results), [out / RESULTS_FILE, out / REPORT_FILE,
                                                  out / PACKAGE_DIR / CARD_MD, out / PACKAGE_DIR / CARD_HTML])  # fmt: skip


def study_run(tracker: Tracker, out: Path, doc: dict) -> str | None:
    metric = doc.get("metric", "auc")
    metrics = []
    for key, model in doc.get("models", {}).items():
        for test_set, block in model.get("eval", {}).items():
            metrics.append((f"{key.replace(':', '.')}/{test_set}/{metric}", block.get(metric), 0))
        if "results" in model:
            metrics += run_metrics(model["results"], prefix=f"{key}/rounds/")
    artifacts = [out / STUDY_FILE, out / REPORT_FILE, out / doc["primary"] / PACKAGE_DIR / CARD_MD]
    return tracker.log_run(
        "study", doc.get("study", {}).get("name", out.name), doc.get("study", {}), metrics, artifacts
    )


def validation_run(tracker: Tracker, out: Path, doc: dict) -> str | None:
    metric = doc["metric"]
    metrics = [(f"{e['label']}/{s}/{metric}", m.get(metric), 0) for e in doc["packages"]
               for s, m in [*e["sites"].items(), ("pooled", e["pooled"])]]  # fmt: skip
    params = {"study": doc.get("study", {}), "packages": {e["label"]: e["package"] for e in doc["packages"]}}
    return tracker.log_run("validation", doc.get("validation_id", out.name), params, metrics,
                           [out / VALIDATION_FILE, out / REPORT_FILE])  # fmt: skip


def monitor_run(tracker: Tracker, out: Path, doc: dict) -> str | None:
    metrics = [(f"psi/{f['feature']}", f.get("psi"), 0) for f in doc["features"] if "psi" in f]
    metrics += [(f"drift/{f['feature']}", float(f["status"] == "drift"), 0) for f in doc["features"]]
    params = {
        "site": doc["site"],
        "package": doc["package"],
        "current": doc["current"],
        "reference": doc["reference"],
    }
    return tracker.log_run(
        "monitor", f"{doc['site']} monitor", params, metrics, [out / MONITOR_FILE, out / REPORT_FILE]
    )
