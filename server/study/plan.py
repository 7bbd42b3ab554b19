"""What a `fedward study` runs: its parts, in order, and the variants of the federated study.

A part is one federated run (`federated`, `federated-dp`, `fedbn`, `leave-one-out:<site>`) or one kind
of in-process training (`local`, `local-dp`, `centralized`, `fine-tuned`); `plan` lists them from the study config's
`study` section, each with the training work it holds (rounds x local epochs x images) for the
estimate of the time left.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import ConfigError
from common.schema import StudyConfig
from server.run_claim import check_run_folder
from server.run_folder import FEDERATED_VARIANTS, LEAVE_ONE_OUT_DIR, Variant, model_key

if TYPE_CHECKING:  # annotations only: reading a study's plan loads no torch
    from common.sitedata import SiteData


def validate_comparison(study: StudyConfig) -> None:
    """The `study` section's values; raises ConfigError naming the key."""
    p, c = study.source_path or "study config", study.study
    if c.bootstrap_samples < 100:
        raise ConfigError(
            f"{p}: 'study.bootstrap_samples' is {c.bootstrap_samples}; a 95% interval needs at least "
            f"100 resamples (1000 is the default)."
        )
    if c.fine_tune_epochs < 0:
        raise ConfigError(f"{p}: 'study.fine_tune_epochs' is {c.fine_tune_epochs}; use 0 (off) or more.")
    if c.calibration_bins < 2:
        raise ConfigError(
            f"{p}: 'study.calibration_bins' is {c.calibration_bins}; use 2 or more (10 is usual)."
        )
    if c.compare_privacy and study.strategy.name == "fedprox":
        raise ConfigError(
            f"{p}: 'study.compare_privacy' needs a strategy that works with privacy; 'strategy.name' "
            f"fedprox does not (use fedavg, fedavgm or fedadam)."
        )


def check_study_folder(out: Path, *, force: bool) -> None:
    """Raise RunFolderError or ConfigError unless a study may start in `out`: a folder holding any run,
    or a study's runs without its claim, is refused unless `force` (which moves it aside). Checks
    only; `fedward study` runs it before loading torch, MONAI and Flower."""
    check_run_folder(out, resume=False, force=force, kind="study")
    if (
        not force
        and out.is_dir()
        and any((out / v).exists() for v in (*FEDERATED_VARIANTS, LEAVE_ONE_OUT_DIR))
    ):
        raise ConfigError(
            f"'{out}' already holds a study's runs (its privacy ledgers would add up with this one's); "
            f"choose a new --out folder, or add --force to move it aside."
        )


def variants(study: StudyConfig) -> list[str]:
    """The federated runs: the study as configured first, then the other way when comparing privacy."""
    first = Variant.FEDERATED_DP if study.privacy.enabled else Variant.FEDERATED
    other = Variant.FEDERATED if first == Variant.FEDERATED_DP else Variant.FEDERATED_DP
    return [first, other] if study.study.compare_privacy else [first]


def with_privacy(study: StudyConfig, private: bool) -> StudyConfig:
    """The study with privacy on or off; a class-balanced loss is not private, so the private runs
    train with the plain loss (study.json's settings say so)."""
    out = copy.deepcopy(study)
    out.privacy.enabled = private
    if private:
        out.train.class_balance = False
    return out


@dataclass
class Part:
    """One part of a study: a federated run, local training at every site, centralized, one left out."""

    key: str  # federated | federated-dp | local | local-dp | centralized | leave-one-out:<site>
    label: str
    units: float  # training work: rounds x local epochs x training images
    simulation: bool
    private: bool
    rounds: int


def plan(study: StudyConfig, data: dict[str, SiteData]) -> list[Part]:
    c, epochs = study.study, study.rounds * study.train.local_epochs
    n = {s: len(d.train_y) for s, d in data.items()}
    total = sum(n.values())
    parts = [
        Part(
            v,
            "federated" + (" with privacy" if v == Variant.FEDERATED_DP else ""),
            epochs * total,
            True,
            v == Variant.FEDERATED_DP,
            study.rounds,
        )
        for v in variants(study)
    ]
    primary_private = variants(study)[0] == Variant.FEDERATED_DP
    if c.fedbn:
        parts.append(Part(Variant.FEDBN, "federated, each site's own normalization", epochs * total, True,
                          primary_private, study.rounds))  # fmt: skip
    if c.fine_tune_epochs:
        parts.append(Part(Variant.FINE_TUNED, "fine-tuned at each site", c.fine_tune_epochs * total, False,
                          primary_private, 1))  # fmt: skip
    if c.local:
        for v in variants(study):
            key = Variant.LOCAL_DP if v == Variant.FEDERATED_DP else Variant.LOCAL
            label = "local-only" + (" with privacy" if v == Variant.FEDERATED_DP else "")
            parts.append(Part(key, label, epochs * total, False, v == Variant.FEDERATED_DP, study.rounds))
    if c.centralized:
        parts.append(
            Part(Variant.CENTRALIZED, "centralized (pooled data)", epochs * total, False, False, study.rounds)
        )
    if c.leave_one_out and len(data) >= 2:
        for s in data:
            parts.append(
                Part(
                    model_key(Variant.LEAVE_ONE_OUT, s),
                    f"leave out {s}",
                    epochs * (total - n[s]),
                    True,
                    study.privacy.enabled,
                    study.rounds,
                )
            )
    return parts
