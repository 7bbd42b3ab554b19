"""The records a study's rounds add to results.json (server.run_folder's shapes): each round's
evaluation, training and privacy, timings, stops and budget warnings; and the resume check."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path

from common.config import ConfigError
from common.keys import Met, Rec
from common.privacy import epsilon_text, epsilon_value, reported
from common.schema import StudyConfig
from server.replies import Replies, site_name
from server.run_folder import Results, RoundRecord

log = logging.getLogger("fedward.coordinator")
RESUME_IGNORED_KEYS = {"rounds", "source_path", "round_timeout_s", "study"}


def check_resumable(saved: dict, study: StudyConfig, where: Path) -> None:
    """Raise ConfigError when `study` differs from the checkpoint's study (other than rounds)."""
    old = {k: v for k, v in saved.items() if k not in RESUME_IGNORED_KEYS}
    new = {k: v for k, v in study.to_dict().items() if k not in RESUME_IGNORED_KEYS}
    changed = sorted(k for k in new if old.get(k) != new.get(k))
    if changed:
        raise ConfigError(
            f"cannot resume in {where}: the study config differs from the "
            f"checkpoint's in {changed}; use the same config or a new --out folder."
        )


def record_stop(results: Results, reason: str, rnd: int, got: Replies) -> None:
    log.error("study stopped: %s", reason)
    results["status"] = "stopped"
    results["stop_reason"] = reason
    results.setdefault("stopped_rounds", []).append(
        {"round": rnd, "refused": got.refused, "failed": got.failed}
    )


def add_privacy(results: Results, record: RoundRecord, got: Replies) -> None:
    """Per site: epsilon spent so far, delta, this round's noise and steps, and any refusal. A site
    that reported nothing this round keeps its last epsilon."""
    previous = results["rounds"][-1]["sites"] if results["rounds"] else {}
    for site, metrics in record["sites"].items():
        known = got.privacy.get(site)
        before = previous.get(site, {})
        metrics.update(
            {
                "epsilon": known["epsilon"] if known else before.get("epsilon", 0.0),
                "delta": known["delta"] if known else before.get("delta"),
                "noise_multiplier": known["noise_multiplier"] if known else None,
                "steps": known["steps"] if known else 0,
                "repeatable_noise": known["repeatable_noise"]
                if known
                else before.get("repeatable_noise", False),
                "privacy_unit": known.get("privacy_unit") if known else before.get("privacy_unit"),
                "refused": got.refused.get(site),
            }
        )


def warn_budget_passed(results: Results, record: RoundRecord, target: float | None) -> None:
    """A warning (log and results.json's `warnings`) the first time a site's spent epsilon passes the
    study's target: rounds trained again after a crash, or rounds added on resume, spend more."""
    if not target:
        return
    warned = {w.get("site") for w in results.get("warnings", []) if w.get("kind") == "budget"}
    for site, metrics in record["sites"].items():
        eps = epsilon_value(metrics.get("epsilon")) or 0.0
        if eps > target and site not in warned:
            why = (
                "its training images were released without differential privacy in a study that trained "
                "without it, which no epsilon bounds"
                if math.isinf(eps)
                else "rounds trained again after a crash or added on resume count too"
            )
            message = (
                f"site '{site}' has spent epsilon {epsilon_text(eps)}, past the study's target_epsilon {target:g}, "
                f"after round {record['round']} ({why})"
            )
            log.warning("%s", message)
            results.setdefault("warnings", []).append(
                {
                    "kind": "budget",
                    "site": site,
                    "round": record["round"],
                    "epsilon": reported(eps),
                    "message": message,
                }
            )


def round_record(rnd: int, got: Replies, evaluation: dict) -> RoundRecord:
    train = {}
    for msg in got.ok:
        m = msg.content[Rec.METRICS]
        train[site_name(msg)] = {  # a private round sends its noised size only, no loss or time
            "n_train": int(m[Met.NUM_EXAMPLES]),
            "loss": float(m[Met.TRAIN_LOSS]) if Met.TRAIN_LOSS in m else None,
            "train_s": float(m[Met.TRAIN_S]) if Met.TRAIN_S in m else None,
        }
    return {
        "round": rnd,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sites": evaluation["sites"],
        "pooled": evaluation["pooled"],
        "participants": sorted(train),
        "train": dict(sorted(train.items())),
        "refused": got.refused,
        "failed": _merged(got.failed, {k: f"evaluation: {v}" for k, v in evaluation["failed"].items()}),
    }


def _merged(training: dict[str, str], evaluation: dict[str, str]) -> dict[str, str]:
    """A site's training and evaluation failures together, in one line each."""
    out = dict(training)
    for site, reason in evaluation.items():
        out[site] = f"{out[site]}; {reason}" if site in out else reason
    return out


def add_timing(results: Results, rnd: int, got: Replies, evaluation: dict, round_s: float) -> None:
    """Append the round's wall time and each site's train and eval seconds (None where it did not)."""
    timing = results["timing"]
    timing["round_s"].append(round(round_s, 4))
    trained = {
        site_name(m): float(m.content[Rec.METRICS][Met.TRAIN_S])
        for m in got.ok
        if Met.TRAIN_S in m.content[Rec.METRICS]
    }
    n_before = rnd - 1
    for key, values in (("train_s", trained), ("eval_s", evaluation["eval_s"])):
        for site in set(timing[key]) | set(values):
            series = timing[key].setdefault(site, [None] * n_before)
            series += [None] * (n_before - len(series))
            series.append(round(values[site], 4) if site in values else None)
