"""A model package as a study's starting point (`model.init_from`) or as what a validation evaluates.

`study_package(path, study)` loads a package (common.package) and checks it against the study: the
same task, classes (names and order), input channels and input size, or a ConfigError naming what
differs and what to do. Its `identity` (the weights' SHA-256, the study that made it, where it lay)
is what results, validations and the new package's lineage record, so a model can always be traced
back through every study it was trained in.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from torch import nn

from common.config import ConfigError
from common.model_spec import model_spec
from common.models import build_model
from common.package import PackageError, load_package, package_folder, package_identity
from common.schema import StudyConfig
from server.run_folder import SITES_DIR


@dataclass
class StudyPackage:
    path: Path  # the package folder
    model: nn.Module
    meta: dict  # its package.json

    @cached_property
    def identity(self) -> dict:
        """What names this package (common.package.package_identity)."""
        return package_identity(self.path, self.meta)

    @property
    def lineage(self) -> list[dict]:
        """This package and every package it was started from, newest first."""
        return [self.identity, *self.meta.get("lineage", [])]


def starting_point(study: StudyConfig, *, in_channels: int, num_classes: int) -> tuple[nn.Module, dict]:
    """The study's round-1 model and what results.json records of where it came from: the
    `model.init_from` package's weights (`init_from`, `lineage`), fresh weights from the seed with the
    `model.pretrained` package's of the same names and shapes (`pretrained_from`, `lineage`), or fresh
    weights ({}). Each package is read and hashed once."""
    if study.model.init_from:
        package = study_package(study.model.init_from, study)
        return package.model, {"init_from": package.identity, "lineage": package.lineage}
    model = build_model(study.model.name, in_channels=in_channels, num_classes=num_classes, seed=study.seed)
    if not study.model.pretrained:
        return model, {}
    package = pretrained_package(study)
    theirs, mine = package.model.state_dict(), model.state_dict()
    model.load_state_dict(
        {**mine, **{k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}}
    )
    return model, {
        "pretrained_from": package.identity,
        "lineage": [package.identity | {"role": "pretrained"}],
    }


def initial_model(study: StudyConfig, *, in_channels: int, num_classes: int) -> nn.Module:
    """The study's round-1 model (starting_point): the federation and the study's in-process
    references (local-only, centralized, a site alone) all start here."""
    return starting_point(study, in_channels=in_channels, num_classes=num_classes)[0]


def pretrained_package(study: StudyConfig) -> StudyPackage:
    """The `model.pretrained` package: the same network, any classes (ConfigError naming what differs)."""
    p, path = study.source_path or "study config", study.model.pretrained
    try:
        model, meta = load_package(path)
    except PackageError as err:
        raise ConfigError(f"{p}: model.pretrained '{path}': {err}") from err
    if meta.get("model") != study.model.name:
        raise ConfigError(f"{p}: model.pretrained '{path}' is a {meta.get('model')}, the study's model.name "
                          f"is {study.model.name}: pretrain the same network")  # fmt: skip
    return StudyPackage(package_folder(path), model, meta)


def _differences(meta: dict, study: StudyConfig) -> list[str]:
    spec = model_spec(study)
    size = tuple(meta.get("input", {}).get("size") or ())
    found = []
    if meta.get("task", "classification") != spec.task:
        found.append(f"its task is {meta.get('task', 'classification')}, the study's {spec.task}")
    if tuple(meta.get("classes", ())) != spec.classes:
        found.append(f"its classes are {list(meta.get('classes', ()))}, the study's {list(spec.classes)}")
    if int(meta.get("in_channels", 0)) != spec.in_channels:
        found.append(f"it takes {meta.get('in_channels')} channel(s), the study {spec.in_channels}")
    if spec.size and size and size != tuple(spec.size):
        found.append(f"its input is {list(size)}, the study's {list(spec.size)}")
    return found


def study_package(
    path: str | Path, study: StudyConfig, *, role: str = "model.init_from", same_network: bool = True
) -> StudyPackage:
    """The package at `path`, checked against `study` (and, with `same_network`, its network is the
    study's `model.name`, as training on from it needs); raises ConfigError naming `role` and what differs."""
    p = study.source_path or "study config"
    try:
        model, meta = load_package(path)
    except PackageError as err:
        raise ConfigError(f"{p}: {role} '{path}': {err}") from err
    problems = _differences(meta, study)
    if same_network and meta.get("model") != study.model.name:
        problems.append(f"it is a {meta.get('model')}, the study's model.name is {study.model.name}")
    if problems:
        raise ConfigError(
            f"{p}: {role} '{path}' is not a model for this study: {'; '.join(problems)}. Give a package "
            "of the same task and classes, or change the study's task, classes and input to the package's."
        )
    return StudyPackage(package_folder(path), model, meta)


def continue_simulated_ledgers(package: StudyPackage, sites: list, state_root: Path) -> list[str]:
    """A simulated continuation's sites go on with the privacy ledgers of the run that made the package.

    Simulated sites keep their ledgers in the run folder (`<run>/sites/<site>`), so a study started from
    a package in a new folder would otherwise begin at epsilon 0 for the same (simulated) patients.
    Each site whose state lies under `state_root` and holds no ledger yet gets a copy of its ledger in
    the package's run folder, when there is one; a hospital's own site keeps its own state_dir, whose
    ledger goes on by itself. Returns the sites whose ledgers were carried over."""
    from client.ledger import LEDGER_FILENAME

    parent_sites = package.path.parent / SITES_DIR
    carried = []
    for site in sites:
        if not site.state_dir or state_root.resolve() not in Path(site.state_dir).resolve().parents:
            continue
        source = parent_sites / site.site / LEDGER_FILENAME
        target = Path(site.state_dir) / LEDGER_FILENAME
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            carried.append(site.site)
    return carried
