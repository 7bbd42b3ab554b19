"""The run folder's contract: every file name, every variant key and the shape of results.json.

Every writer (coordinator, simulate, study) and every reader (report, benchmarks, tests) takes its
names from here, so a renamed file or key changes in one place.

    DIR/results.json            a federated run (`fedward simulate`, each federated run of a study)
    DIR/final_model.pt          its final global model (common.models.load_model)
    DIR/checkpoints/round-NNNN.pt   the newest checkpoints (resume)
    DIR/fedward.log             the run's log
    DIR/sites/<site>/           simulated sites' state (privacy ledger, image cache)
    DIR/study.json              a `fedward study`: every number (see server.study)
    DIR/validation.json         a `fedward validate`: packages evaluated at every site (server.validate)
    DIR/progress.json           a running study's latest state
    DIR/monitor.json            a `fedward site monitor`: drift findings (server.report.monitor)
    DIR/report.html + *.png     the report (server.report)
    DIR/models/<variant>[-<site>].pt   a study's in-process models (local-only, centralized)
"""

from __future__ import annotations

import errno
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict

from common.config import ConfigError
from common.files import json_safe, write_json  # noqa: F401 - the run folder's writers
from common.validation_doc import VALIDATION_FILE, VALIDATION_KIND  # noqa: F401 - the run folder's names

RESULTS_FILE = "results.json"
STUDY_FILE = "study.json"
PROGRESS_FILE = "progress.json"
REPORT_FILE = "report.html"
MONITOR_FILE = "monitor.json"  # a `fedward site monitor`'s findings (server.report.monitor)
FINAL_MODEL_FILE = "final_model.pt"
LOG_FILE = "fedward.log"
CHECKPOINTS_DIR = "checkpoints"
SITES_DIR = "sites"
MODELS_DIR = "models"
LEAVE_ONE_OUT_DIR = "leave-one-out"

STUDY_KIND = "fedward-study"  # study.json's "kind"
STUDY_VERSION = 1


class Variant(StrEnum):
    """The kinds of model a study trains; `local` and `local-dp` models are one per site
    (`local:<site>`), `leave-one-out` one per held-out site (`leave-one-out:<site>`)."""

    FEDERATED = "federated"
    FEDERATED_DP = "federated-dp"
    LOCAL = "local"
    LOCAL_DP = "local-dp"
    CENTRALIZED = "centralized"
    LEAVE_ONE_OUT = "leave-one-out"
    FEDBN = "fedbn"  # per site: the FedBN-style federation's model with the site's own normalization
    FINE_TUNED = "fine-tuned"  # per site: the federated model fine-tuned at the site


FEDERATED_VARIANTS = (Variant.FEDERATED, Variant.FEDERATED_DP)
PERSONALIZED = (Variant.FEDBN, Variant.FINE_TUNED)  # one model per site, made from a federation
LOCAL_OF = {Variant.FEDERATED: Variant.LOCAL, Variant.FEDERATED_DP: Variant.LOCAL_DP}
VARIANT_LABELS = {
    Variant.LOCAL: "local only",
    Variant.LOCAL_DP: "local only, DP",
    Variant.FEDERATED: "federated",
    Variant.FEDERATED_DP: "federated, DP",
    Variant.CENTRALIZED: "centralized",
    Variant.LEAVE_ONE_OUT: "left out of the federation",
    Variant.FEDBN: "federated, own normalization",
    Variant.FINE_TUNED: "federated, fine-tuned at the site",
}


def model_key(variant: Variant | str, site: str | None = None) -> str:
    """The key of a study's model in study.json's `models`: `local:<site>`, `centralized`, ..."""
    return f"{variant}:{site}" if site else str(variant)


def split_key(key: str) -> tuple[str, str | None]:
    """`local:hospital-a` -> ("local", "hospital-a"); `federated` -> ("federated", None)."""
    variant, _, site = key.partition(":")
    return variant, site or None


# ----------------------------------------------------------------------------- results.json


class Metrics(TypedDict, total=False):
    n_test: int
    auc: float | None
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    balanced_accuracy: float | None
    epsilon: float | str  # with privacy: cumulative, the site's whole ledger ("unbounded": common.privacy)
    delta: float | None
    noise_multiplier: float | None
    steps: int
    repeatable_noise: bool  # the site's noise was seeded: not private against the coordinator
    privacy_unit: str  # patient (patient-level DP: the site's data has patient ids) | image
    release: str  # what the site's evaluation released: dp_histogram | summary | exact
    evaluation_epsilon: float | str  # dp_histogram: the site's test images' epsilon so far ("unbounded")
    refused: str | None


class Evaluation(TypedDict):
    sites: dict[str, Metrics]
    pooled: Metrics


class TrainRecord(TypedDict):
    n_train: int
    loss: float
    train_s: float


class RoundRecord(Evaluation):
    round: int
    finished_at: str
    participants: list[str]
    train: dict[str, TrainRecord]
    refused: dict[str, str]
    failed: dict[str, str]


class Timing(TypedDict):
    total_s: float
    round_s: list[float]
    train_s: dict[str, list[float | None]]
    eval_s: dict[str, list[float | None]]


class Results(TypedDict, total=False):
    study_id: str
    study: dict[str, Any]
    status: str  # running | completed | stopped | interrupted
    stop_reason: str
    interrupted: dict[str, Any]  # signal, round_reached, at, resume (the command that continues it)
    warnings: list[dict[str, Any]]  # e.g. kind "budget": a site's epsilon passed the study's target
    initial: Evaluation
    rounds: list[RoundRecord]
    final: dict[str, Any]  # Evaluation plus "round"
    timing: Timing


def new_results(study_id: str, study: dict) -> Results:
    """The results.json of a run that has not evaluated anything yet."""
    return {
        "study_id": study_id,
        "study": study,
        "status": "running",
        "rounds": [],
        "initial": {"sites": {}, "pooled": {}},
        "final": {},
        "timing": {"total_s": 0.0, "round_s": [], "train_s": {}, "eval_s": {}},
    }


def final_epsilon(results: Results) -> dict[str, float | str | None]:
    """Each site's epsilon at the end of a private run (None where the site reported none)."""
    return {s: m.get("epsilon") for s, m in results.get("final", {}).get("sites", {}).items()}


def participants(results: Results) -> list[str]:
    """Every site whose update was aggregated in some round."""
    return sorted({p for r in results.get("rounds", []) for p in r.get("participants", [])})


def nodes(results: Results) -> list[str]:
    """Every site that was a node of the run: evaluated or trained in any round."""
    names = set(results.get("initial", {}).get("sites", {}))
    for r in results.get("rounds", []):
        names |= set(r.get("sites", {})) | set(r.get("participants", [])) | set(r.get("train", {}))
    return sorted(names)


def site_names(results: Results) -> list[str]:
    """The sites of a run, in the order results.json lists them."""
    names: list[str] = []
    for block in [results.get("initial", {}), *results.get("rounds", [])]:
        names += [s for s in block.get("sites", {}) if s not in names]
    return names


# ----------------------------------------------------------------------------- writing JSON


# ----------------------------------------------------------------------------- I/O failures


class RunFolderError(ConfigError):
    """A run folder cannot be used: in use, holding another run, not a folder, not writable, full."""


def io_error(path: Path, err: OSError, doing: str) -> RunFolderError:
    """A clear message for an I/O failure at `path` while `doing` something: what went wrong, what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = "the disk is full (or the file size limit is reached)"
        todo = "free space there or choose another --out; the files written before are intact"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "it is read-only or not writable by this user"
        todo = "choose a writable --out folder"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        what = "a file stands where a folder is needed"
        todo = "choose another --out folder, or move the file away"
    else:
        what, todo = err.strerror or str(err), "check the path and try again"
    return RunFolderError(f"cannot {doing} {path}: {what} ({err.__class__.__name__}); {todo}.")
