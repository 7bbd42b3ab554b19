"""`fedward validate`: existing model packages evaluated at every site, training nothing.

    fedward validate runs/demo/model runs/demo-v2/model --study configs/demo.yaml --out runs/validate
    flwr run . <federation> --run-config 'validate-packages="runs/demo/model" out-dir="runs/validate"'

Each package is checked against the study first (server.packages: task, classes, channels, input
size; a package of another network is evaluated as that network). Then the coordinator sends each
package's weights to every site as an ordinary evaluation (server.coordinator.evaluate_all), so every
site applies its own evaluation policy, releases what that policy allows and charges its evaluation
budget, exactly as in a study, and may refuse. Nothing is trained. DIR gets validation.json (per
package: per-site and pooled metrics with their 95% AUC intervals from the releases, the sites that
refused; the cross-site table), written after each package, and fedward.log; `fedward validate`
then writes report.html (over a deployment, `fedward report DIR` does: the app Flower ships holds no
page templates).
`fedward compare OLD NEW` (server.compare) reads validation.json.
"""

from __future__ import annotations

import copy
import logging
import uuid
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common.model_spec import model_spec
from common.package import package_labels
from common.schema import StudyConfig
from common.validation_doc import VALIDATION_FILE, finish, new_validation
from server.coordinator import Coordinator, Reporter
from server.interrupt import Interrupted, StopRequest
from server.packages import StudyPackage, study_package
from server.run_folder import write_json
from server.store import RunStore

log = logging.getLogger("fedward.validate")


def check_packages(study: StudyConfig, packages: list[str | Path]) -> list[StudyPackage]:
    """Every package loaded and checked against the study, before any site is asked anything."""
    if not packages:
        raise ValueError("give at least one model package to validate")
    return [study_package(p, study, role="package", same_network=False) for p in packages]


def labels_of(packages: list[StudyPackage]) -> list[str]:
    return package_labels([(p.path, p.meta) for p in packages])


class Validation:
    """The packages evaluated at every site of `grid`, one after the other (see the module docstring)."""

    def __init__(self, grid: Grid, study: StudyConfig, packages: list[str | Path], out_dir: str | Path, *,
                 n_sites: int, reporter: Reporter | None = None, stop: StopRequest | None = None):  # fmt: skip
        self.study, self.out = study, Path(out_dir)
        self.packages = check_packages(study, packages)
        self.coordinator = Coordinator(grid, study, out_dir, spec=model_spec(study), n_sites=n_sites,
                                       reporter=reporter, stop=stop)  # fmt: skip
        self.coordinator.study_id = f"{study.name}-validate-{uuid.uuid4().hex[:8]}"  # the ledgers' study
        self.doc = new_validation(self.coordinator.study_id, study.to_dict(), study.task)

    def save(self) -> None:
        write_json(self.out / VALIDATION_FILE, self.doc)

    def run(self) -> dict:
        handler = self.coordinator.store.attach_log()
        try:
            self.coordinator.wait_for_sites()
            for i, (package, label) in enumerate(
                zip(self.packages, labels_of(self.packages), strict=True), 1
            ):
                self._evaluate(i, package, label)
                self.save()
            status = "completed"
        except Interrupted as why:
            status = "interrupted"
            self.doc["interrupted"] = {"signal": str(why), "packages_done": len(self.doc["packages"])}
        finally:
            RunStore.detach_log(handler)
        finish(self.doc, status)
        self.save()
        return self.doc

    def _evaluate(self, index: int, package: StudyPackage, label: str) -> None:
        """One package at every site: its network and the evaluation round number `index` (the ledgers'
        line names it)."""
        study = copy.deepcopy(self.study)
        study.model.name = str(package.meta["model"])
        study.model.init_from = ""
        study.rounds = max(study.rounds, len(self.packages))
        self.coordinator.study = study
        self.coordinator.reporter.phase(index, f"validating {label}")
        evaluation = self.coordinator.evaluate_all(index, ArrayRecord(package.model.state_dict()))
        log.info("validated %s: pooled %s %s; refused or failed: %s", label, self.doc["metric"],
                 evaluation["pooled"].get(self.doc["metric"]), evaluation["failed"] or "none")  # fmt: skip
        self.doc["packages"].append(
            {"label": label, **package.identity, "sites": evaluation["sites"], "pooled": evaluation["pooled"],
             "failed": evaluation["failed"]}
        )  # fmt: skip
