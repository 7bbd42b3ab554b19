"""What one round of local training does: the one description the coordinator sends and a site reads.

The coordinator makes a `RoundPlan` from the study config for every round (`RoundPlan.from_study`) and
sends it as the round's ConfigRecord (`to_config`, keys in common.keys.Cfg); a site reads it back
(`RoundPlan.from_config`) and trains with `client.train.train_round`. The study's in-process references
(local-only, centralized) make the same plan from the same study config, so every model in a study is
trained by one recipe with one schedule. Privacy settings travel beside it (common.privacy).

    plan = RoundPlan.from_study(study, 3, in_channels=1, num_classes=2, study_id="demo-1a2b")
    RoundPlan.from_config(plan.to_config()) == plan
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from common.keys import Cfg
from common.schema import StudyConfig


class RoundPlanError(ValueError):
    """A round's ConfigRecord lacks a key or holds a value of the wrong type: names the key."""


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    round: int  # the coordinator's server round, from 1
    local_epochs: int
    batch_size: int
    lr: float  # this round's learning rate: the study's lr * lr_decay ** (round - 1)
    optimizer: str  # adam | sgd
    augment: bool  # the study's simple flips and shifts (a site's own augmentation wins)
    class_balance: bool  # class-weighted loss from the site's own labels (never with privacy)
    model: str
    in_channels: int
    num_classes: int
    seed: int
    study_id: str  # the run: a site's ledger keeps rounds per study
    planned_rounds: int  # the study's rounds, for deriving the noise of the whole study
    dp_enabled: bool
    proximal_mu: float = 0.0  # FedProx's proximal term (Flower's FedProx adds it to the config)
    # the study's model (common.model_spec), which each site checks against its data
    task: str = "classification"
    classes: tuple[str, ...] = ()
    size: tuple[int, ...] = ()
    local_norm: bool = False  # FedBN-style: the site keeps its normalization parameters (client.local_norm)
    augment_views: int = 1  # augmentation multiplicity: views per image, averaged before clipping (DP)
    acquisition_augment: bool = False  # harmonization: images re-rendered as other scanners might
    max_physical_batch: int = 0  # DP: logical batches cut into physical ones of at most this (0: not)

    @classmethod
    def from_study(
        cls,
        study: StudyConfig,
        round_: int,
        *,
        in_channels: int,
        num_classes: int,
        study_id: str = "",
        classes: tuple[str, ...] = (),
        size: tuple[int, ...] = (),
    ) -> RoundPlan:
        t = study.train
        return cls(
            round=round_,
            local_epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr * t.lr_decay ** max(round_ - 1, 0),
            optimizer=t.optimizer,
            augment=t.augment,
            class_balance=t.class_balance,
            model=study.model.name,
            in_channels=in_channels,
            num_classes=num_classes,
            seed=study.seed,
            study_id=study_id,
            planned_rounds=study.rounds,
            dp_enabled=study.privacy.enabled,
            task=study.task,
            classes=tuple(classes),
            size=tuple(size),
            local_norm=study.strategy.local_norm,
            augment_views=t.augment_views,
            acquisition_augment=t.acquisition_augment,
            max_physical_batch=t.max_physical_batch,
        )

    def to_config(self) -> dict[str, int | float | str | bool | list]:
        """The plan as ConfigRecord values (kebab-case keys; tuples as lists)."""
        values = {str(_KEYS[f.name]): getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RoundPlan:
        """Read a round's ConfigRecord (other keys are ignored); raises RoundPlanError naming the key."""
        values = {}
        for f in dataclasses.fields(cls):
            key = str(_KEYS[f.name])
            if key not in config:
                if f.default is not dataclasses.MISSING:
                    continue
                raise RoundPlanError(f"the round's config has no '{key}'")
            values[f.name] = _typed(key, config[key], f.type)
        return cls(**values)


_KEYS = {
    "round": Cfg.SERVER_ROUND,
    "local_epochs": Cfg.LOCAL_EPOCHS,
    "batch_size": Cfg.BATCH_SIZE,
    "lr": Cfg.LR,
    "optimizer": Cfg.OPTIMIZER,
    "augment": Cfg.AUGMENT,
    "class_balance": Cfg.CLASS_BALANCE,
    "model": Cfg.MODEL,
    "in_channels": Cfg.IN_CHANNELS,
    "num_classes": Cfg.NUM_CLASSES,
    "seed": Cfg.SEED,
    "study_id": Cfg.STUDY_ID,
    "planned_rounds": Cfg.PLANNED_ROUNDS,
    "dp_enabled": Cfg.DP_ENABLED,
    "proximal_mu": Cfg.PROXIMAL_MU,
    "task": Cfg.TASK,
    "classes": Cfg.CLASSES,
    "size": Cfg.SIZE,
    "local_norm": Cfg.LOCAL_NORM,
    "augment_views": Cfg.AUGMENT_VIEWS,
    "acquisition_augment": Cfg.ACQUISITION_AUGMENT,
    "max_physical_batch": Cfg.MAX_PHYSICAL_BATCH,
}


def _typed(key: str, value: object, type_name: str) -> object:
    if type_name.startswith("tuple["):  # tuple[str, ...] or tuple[int, ...]: a list in the record
        item = type_name[len("tuple[") :].split(",")[0]
        if not isinstance(value, list | tuple):
            raise RoundPlanError(f"'{key}' must be a list, got {value!r}")
        return tuple(_typed(key, v, item) for v in value)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise RoundPlanError(f"'{key}' must be true or false, got {value!r}")
        return value
    if type_name == "str":
        if not isinstance(value, str):
            raise RoundPlanError(f"'{key}' must be text, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RoundPlanError(f"'{key}' must be a number, got {value!r}")
    if type_name == "int":
        if float(value) != int(value):
            raise RoundPlanError(f"'{key}' must be a whole number, got {value!r}")
        return int(value)
    return float(value)
