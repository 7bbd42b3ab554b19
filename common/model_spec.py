"""What the model is, from the study config alone: its task, classes and input.

The coordinator builds the model from `model_spec(study)` in simulation and in deployment alike, and
never reads a site's data or a site config to do it: a coordinator runs where no site's data is, and
a site's files are none of its business. What the study does not say, the data source it names does
(synthetic: fedward's own classes and channels; a MedMNIST set fedward knows: its class names and
channels, without opening the file); a study over hospitals' own sites (`data.source: sites`) must
name its classes.

Every site checks the study against its data before it trains or evaluates (`spec_problem`): a
site whose classes, channels, input size or task differ refuses, naming what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.known_data import (
    KNOWN_CHANNELS,
    KNOWN_CLASSES,
    KNOWN_MODALITIES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_SEGMENTATION_CLASSES,
)
from common.round import RoundPlan
from common.schema import SEGMENTATION_MODELS, VOLUME_MODELS, ConfigError, StudyConfig

if TYPE_CHECKING:
    from common.sitedata import SiteData

TASKS = ("classification", "segmentation")


class ModelSpecError(ConfigError):
    """The study config does not say enough to build the model: names the key to set."""


@dataclass(frozen=True)
class ModelSpec:
    task: str
    classes: tuple[str, ...]
    in_channels: int
    size: tuple[int, ...]  # (H, W), or (D, H, W) for volumes; () when the study does not fix it
    modalities: tuple[str, ...]
    spacing: tuple[float, ...] = ()  # volumes: (slice, row, col) mm the sites resample to; () as stored
    volume: bool = False  # a 3-D model (common.schema.VOLUME_MODELS)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def problem_with(self, data: SiteData) -> str | None:
        """What differs between this model and a site's data (as `spec_problem`); None if nothing."""
        return _difference(
            self.task, self.classes, self.num_classes, self.in_channels, self.size, data, self.volume
        )


def model_spec(study: StudyConfig) -> ModelSpec:
    """The model the study trains, from the study config and its data source's known facts only."""
    p, source = study.source_path or "study config", study.data.source
    dataset = study.data.dataset.lower()
    if study.task not in TASKS:
        raise ModelSpecError(f"{p}: 'task' is {study.task!r}; fedward trains {', '.join(TASKS)}.")
    if (study.task == "segmentation") != (study.model.name in SEGMENTATION_MODELS):
        raise ModelSpecError(
            f"{p}: 'task' {study.task} with 'model.name' {study.model.name}: segmentation takes "
            f"{', '.join(SEGMENTATION_MODELS)}, classification any other model"
        )
    if study.task == "segmentation" and study.train.class_balance:
        raise ModelSpecError(
            f"{p}: 'train.class_balance' weighs image labels; segmentation has none (Dice + CE)."
        )
    classes = list(study.classes)
    if not classes and source == "synthetic":
        classes = list(SYNTHETIC_SEGMENTATION_CLASSES if study.task == "segmentation" else SYNTHETIC_CLASSES)
    elif not classes and source == "medmnist":
        classes = list(KNOWN_CLASSES.get(dataset, []))
    if len(classes) < 2:
        raise ModelSpecError(
            f"{p}: the study names no classes ('classes: [...]', in label order): the coordinator builds "
            "the model from the study alone and does not read the sites' label sheets"
            + (
                f" (fedward does not know the classes of MedMNIST set {dataset!r})"
                if source == "medmnist"
                else ""
            )
        )
    channels = study.input.channels or (KNOWN_CHANNELS.get(dataset, 1) if source == "medmnist" else 1)
    size = list(study.input.size)
    syn = study.data.synthetic
    if not size and source == "synthetic":
        size = ([syn.depth] if syn.depth else []) + [syn.image_size] * 2
    elif not size and source == "medmnist":
        size = [28, 28]
    modalities = [m.upper() for m in study.input.modalities] or (
        KNOWN_MODALITIES.get(dataset, []) if source == "medmnist" else []
    )
    volume = study.model.name in VOLUME_MODELS
    if size and len(size) != (3 if volume else 2):
        raise ModelSpecError(
            f"{p}: 'model.name' {study.model.name} is a {'3' if volume else '2'}-D network but the input is "
            f"{size}; use a {'3-D model (' + ', '.join(VOLUME_MODELS) + ')' if len(size) == 3 else '2-D model'} "
            "or the matching 'input.size'"
        )
    return ModelSpec(study.task, tuple(classes), int(channels), tuple(int(v) for v in size), tuple(modalities),
                     tuple(float(v) for v in study.input.spacing), volume)  # fmt: skip


def spec_problem(plan: RoundPlan, data: SiteData) -> str | None:
    """What differs between the study's model (in the round's plan) and the site's data; None if nothing."""
    volume = plan.model in VOLUME_MODELS
    return _difference(plan.task, plan.classes, plan.num_classes, plan.in_channels, plan.size, data, volume)


def _difference(task, classes, num_classes, in_channels, size, data: SiteData, volume: bool) -> str | None:
    if volume != (data.train_x.ndim == 5):
        return (
            f"the study's model is {'3' if volume else '2'}-D; this site's images are "
            f"{'volumes' if data.train_x.ndim == 5 else '2-D'} (data.volume in the site config)"
        )
    if task != data.task:
        return f"the study's task is {task!r}; this site's data is for {data.task} (masks: segmentation)"
    if classes and list(classes) != list(data.classes):
        return (
            f"the study's classes {list(classes)} differ from this site's {list(data.classes)} "
            "(names and order must match: label i is class i)"
        )
    if num_classes != data.num_classes:
        return f"the study's model has {num_classes} classes; this site's data has {data.num_classes}"
    if in_channels != data.in_channels:
        return (
            f"the study's model takes {in_channels} channel(s); this site's images have {data.in_channels} "
            "(data.colour and data.preprocess.channels in the site config)"
        )
    have = tuple(int(v) for v in data.train_x.shape[2:])
    if size and tuple(size) != have:
        return f"the study's model takes {list(size)} pixels; this site's images are {list(have)} (data.preprocess.size)"
    return None
