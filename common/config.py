"""Study and site configs read strictly from YAML into the dataclasses of `common.schema`.

Unknown keys, wrong types and impossible values raise `ConfigError` naming the file and the key.
Loading reads the config file only: whether data files can be read is checked where the data is
loaded (`server.simulate.preflight`, `fedward site check`), before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from common.schema import (
    GRAD_SAMPLE_MODES,
    MIN_INPUT_SIZE,
    MODEL_NAMES,
    NORMALIZE_MODES,
    ConfigError,
    PreprocessConfig,
    SiteConfig,
    SiteDataConfig,
    StudyConfig,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "FEDWARD_DATA"  # overrides `data.data_dir` of a study config
MAX_INPUT_SIDE = 4096  # pixels (or slices) along any side of a model's input


def _from_dict(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: '{where or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source_path"]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key '{dotted}'.{hint} Known keys here: {', '.join(names)}.")
        kwargs[key] = _coerce(hints[key], value, dotted, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value or {}, where, path)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: '{where}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: '{where}' must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: '{where}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: '{where}' must be a finite number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{path}: '{where}' must be a whole number, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: '{where}' must be a string, got {value!r}")
        return value
    return value


def _read_yaml(path: str | Path, kind: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} config '{p}' does not exist (looked in {p.resolve()}).")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read the {kind} config ({err}).") from err
    if data is None:
        example = "configs/demo.yaml" if kind == "study" else "deploy/local/sites/hospital-a.yaml"
        raise ConfigError(f"{p}: the {kind} config is empty; write its keys (see {example} for an example).")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a {kind} config must be a YAML mapping at the top level.")
    return data


def _choice(value: str, allowed: tuple[str, ...], key: str, path: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: '{key}' is '{value}'; use one of: {', '.join(allowed)}.")


def _positive(value: float, key: str, path: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def load_study(
    path: str | Path,
    *,
    rounds: int | None = None,
    num_sites: int | None = None,
    data_dir: str | None = None,
) -> StudyConfig:
    """Read and validate a study config; command-line overrides win over FEDWARD_DATA and the file."""
    p = str(path)
    study = _from_dict(StudyConfig, _read_yaml(path, "study"), "", p)
    study.source_path = str(Path(path).resolve())
    for option, value in (("--rounds", rounds), ("--sites", num_sites)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} is {value}; a study needs at least one round and one site.")
    if rounds is not None:
        study.rounds = rounds
    if num_sites is not None:
        study.data.num_sites = num_sites
        if len(study.data.site_names) > num_sites:
            study.data.site_names = study.data.site_names[:num_sites]
    if data_dir:
        study.data.data_dir = data_dir
    elif os.environ.get(DATA_ENV):
        study.data.data_dir = os.environ[DATA_ENV]
    validate_study(study)
    return study


def with_changes(study: StudyConfig, changes: dict[str, Any]) -> StudyConfig:
    """A validated copy of `study` with dotted-key `changes` ({"train.lr": 0.002}), each value checked
    as the same key in a YAML file is: an unknown key or a wrong type is a ConfigError naming it."""
    out = copy.deepcopy(study)
    p = study.source_path or "study config"
    for key, value in changes.items():
        parts = key.split(".")
        target = out
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            if not dataclasses.is_dataclass(target):
                raise ConfigError(
                    f"{p}: '{'.'.join(parts[:depth])}' is a value, not a section: no '{where}'."
                )
            names = [f.name for f in dataclasses.fields(target) if f.name != "source_path"]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{p}: unknown key '{where}'.{hint} Known keys here: {', '.join(names)}.")
            if depth < len(parts) - 1:
                target = getattr(target, part)
        setattr(target, parts[-1], _coerce(typing.get_type_hints(type(target))[parts[-1]], value, key, p))
    validate_study(out)
    return out


MAX_STUDY_NAME = 200  # a site refuses study ids over 256 characters (client.guard); the ids add suffixes


def validate_study(study: StudyConfig) -> None:
    """Every check a study config gets before anything runs; raises ConfigError naming the key."""
    p = study.source_path or "study config"
    if not 0 < len(study.name) <= MAX_STUDY_NAME:
        raise ConfigError(
            f"{p}: 'name' must be 1 to {MAX_STUDY_NAME} characters (it starts the study id every site keeps "
            f"in its ledger), got {len(study.name)}."
        )
    _validate_choices(study, p)
    _validate_sites(study, p)
    _validate_privacy(study, p)
    _validate_input(study, p)


def _validate_input(study: StudyConfig, p: str) -> None:
    """The study's statement of its model: enough to build it without any site's data."""
    from common.model_spec import model_spec

    inp = study.input
    if inp.channels not in (0, 1, 3):
        raise ConfigError(
            f"{p}: 'input.channels' is {inp.channels}; use 1 (grey) or 3 (colour), or 0 for the data's own."
        )
    if inp.size and (len(inp.size) not in (2, 3) or min(inp.size) < 1 or max(inp.size) > MAX_INPUT_SIDE):
        raise ConfigError(
            f"{p}: 'input.size' is {inp.size}; use [height, width] in pixels ([slices, height, width] for "
            "volumes), or []."
        )
    if inp.spacing and (len(inp.spacing) != 3 or min(inp.spacing) <= 0):
        raise ConfigError(
            f"{p}: 'input.spacing' is {inp.spacing}; use [slice, row, col] in mm, each > 0, or []."
        )
    if study.data.synthetic.depth and study.data.synthetic.colour:
        raise ConfigError(f"{p}: 'data.synthetic.colour' is for 2-D images; synthetic volumes are grey.")
    if not 0 <= study.data.synthetic.depth <= 256:
        raise ConfigError(
            f"{p}: 'data.synthetic.depth' must be from 0 (2-D) to 256, got {study.data.synthetic.depth}."
        )
    if len(set(study.classes)) != len(study.classes):
        raise ConfigError(f"{p}: 'classes' has repeats: {study.classes}.")
    model_spec(study)  # raises ModelSpecError (a ConfigError) naming what the study must say


def _validate_choices(study: StudyConfig, p: str) -> None:
    _choice(study.data.source, ("synthetic", "medmnist", "sites"), "data.source", p)
    _choice(study.data.normalize, NORMALIZE_MODES, "data.normalize", p)
    _choice(study.data.partition.scheme, ("iid", "label_skew"), "data.partition.scheme", p)
    _choice(study.model.name, MODEL_NAMES, "model.name", p)
    _choice(study.strategy.name, ("fedavg", "fedprox", "fedadam", "fedavgm", "scaffold"), "strategy.name", p)
    _choice(study.strategy.weighting, ("examples", "sites"), "strategy.weighting", p)
    _choice(study.train.optimizer, ("adam", "sgd"), "train.optimizer", p)
    _choice(study.privacy.grad_sample_mode, GRAD_SAMPLE_MODES, "privacy.grad_sample_mode", p)
    _choice(
        study.operating_point.rule,
        ("youden", "sensitivity", "specificity", "none"),
        "operating_point.rule",
        p,
    )
    if not 0 < study.operating_point.target < 1:
        raise ConfigError(
            f"{p}: 'operating_point.target' is {study.operating_point.target}; use a rate in (0, 1), e.g. 0.95."
        )
    for key, value in [
        ("rounds", study.rounds),
        ("train.local_epochs", study.train.local_epochs),
        ("train.batch_size", study.train.batch_size),
        ("train.lr", study.train.lr),
        ("train.lr_decay", study.train.lr_decay),
        ("data.partition.alpha", study.data.partition.alpha),
        ("privacy.delta", study.privacy.delta),
        ("privacy.max_grad_norm", study.privacy.max_grad_norm),
        ("privacy.target_epsilon", study.privacy.target_epsilon),
        ("round_timeout_s", study.round_timeout_s),
    ]:
        _positive(value, key, p)
    if not study.privacy.delta < 1:
        raise ConfigError(
            f"{p}: 'privacy.delta' is {study.privacy.delta}; delta is a probability of failure and must "
            f"be in (0, 1), far below 1 / (images at a site), e.g. 1e-5."
        )


def _validate_sites(study: StudyConfig, p: str) -> None:
    syn = study.data.synthetic
    for key, value, most in (
        ("data.synthetic.train_per_site", syn.train_per_site, 100_000),
        ("data.synthetic.test_per_site", syn.test_per_site, 100_000),
        ("data.synthetic.image_size", syn.image_size, 1024),
        ("data.num_sites", study.data.num_sites, 1000),
    ):
        if not 1 <= value <= most:
            raise ConfigError(f"{p}: '{key}' must be from 1 to {most:,}, got {value}.")
    if not 0 <= syn.val_per_site <= 100_000:
        raise ConfigError(
            f"{p}: 'data.synthetic.val_per_site' must be from 0 to 100,000, got {syn.val_per_site}."
        )
    if not 0 <= study.seed < 2**32:  # numpy's and torch's generators take seeds from 0
        raise ConfigError(f"{p}: 'seed' must be a whole number from 0 to 2**32 - 1, got {study.seed}.")
    n = len(study.data.site_configs) if study.data.source == "sites" else study.data.num_sites
    if n < 1:
        raise ConfigError(f"{p}: a study needs at least one site ('data.num_sites' is {n}).")
    if study.min_sites > n:
        raise ConfigError(
            f"{p}: 'min_sites' is {study.min_sites} but the study has only {n} sites; "
            f"lower 'min_sites' or add sites."
        )
    if study.data.source == "medmnist":
        if not study.data.dataset:
            raise ConfigError(f"{p}: 'data.dataset' is empty; name a MedMNIST file, e.g. pneumoniamnist.")
        npz = medmnist_path(study)
        if not npz.is_file():
            raise ConfigError(
                f"{p}: data file '{npz}' does not exist. Put {study.data.dataset}.npz there, or point "
                f"'data.data_dir', the {DATA_ENV} environment variable or --data-dir at the folder "
                f"that holds it (for example ../shared/data)."
            )
    needed = MIN_INPUT_SIZE.get(study.model.name, 0)
    size = study.data.synthetic.image_size
    if study.data.source == "synthetic" and size < needed:  # other sources: checked when loaded
        raise ConfigError(
            f"{p}: 'model.name' {study.model.name} needs images of at least {needed}x{needed} pixels, "
            f"but this study's are {size}x{size}; use cnn28, resnet10 or resnet18 for small images."
        )
    if study.data.source == "sites" and not study.data.site_configs:
        raise ConfigError(f"{p}: 'data.source' is 'sites' but 'data.site_configs' is empty.")
    if study.data.source == "sites" and study.data.normalize != "none":
        raise ConfigError(
            f"{p}: 'data.normalize' applies to simulated sites; with 'data.source: sites' each hospital "
            "standardizes its own images (data.preprocess.normalize in its site config)."
        )


def _validate_privacy(study: StudyConfig, p: str) -> None:
    if study.privacy.enabled and study.strategy.name == "fedprox":
        raise ConfigError(
            f"{p}: 'strategy.name' fedprox is not available with privacy (its proximal term is not "
            f"clipped per sample); use fedavg, fedavgm or fedadam with 'privacy.enabled: true'."
        )
    if study.privacy.enabled and study.train.class_balance:
        raise ConfigError(
            f"{p}: 'train.class_balance' is not available with privacy: class weights counted on a "
            "site's data make every sample's gradient depend on the others, which DP-SGD's accounting "
            "does not cover; set 'train.class_balance: false' with 'privacy.enabled: true'."
        )
    if study.strategy.name == "scaffold" and (study.strategy.local_norm or study.study.fedbn):
        raise ConfigError(
            f"{p}: 'strategy.name' scaffold with site-local normalization ('strategy.local_norm' or "
            "'study.fedbn'): those parameters never change in the updates, so SCAFFOLD's control "
            "variates for them would be wrong; use one or the other."
        )
    for key in ("ema_decay", "server_momentum"):
        if not 0 <= getattr(study.strategy, key) < 1:
            raise ConfigError(
                f"{p}: 'strategy.{key}' is {getattr(study.strategy, key)}; use 0 (off) up to below 1."
            )
    if study.strategy.server_lr < 0:
        raise ConfigError(f"{p}: 'strategy.server_lr' must be > 0 (0: the strategy's default).")
    if not 1 <= study.train.augment_views <= 32:
        raise ConfigError(f"{p}: 'train.augment_views' is {study.train.augment_views}; use 1 (off) to 32.")
    if study.privacy.enabled and study.privacy.noise_multiplier < 0:
        raise ConfigError(f"{p}: 'privacy.noise_multiplier' must be >= 0 (0 derives it from target_epsilon).")


def medmnist_path(study: StudyConfig) -> Path:
    """The study's MedMNIST `.npz` file: `data.dataset` in `data.data_dir`."""
    name = study.data.dataset
    return Path(study.data.data_dir or ".").expanduser().resolve() / (
        name if name.endswith(".npz") else f"{name}.npz"
    )


def load_site(path: str | Path) -> SiteConfig:
    p = str(path)
    site = _from_dict(SiteConfig, _read_yaml(path, "site"), "", p)
    site.source_path = str(Path(path).resolve())
    _choice(site.data.format, ("synthetic", "medmnist", "dicom", "image", "nifti"), "data.format", p)
    _choice(site.data.on_bad_file, ("skip", "fail"), "data.on_bad_file", p)
    _validate_site_data(site.data, p)
    _validate_site_privacy(site, p)
    for key, value in dataclasses.asdict(site.limits).items():
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{p}: 'limits.{key}' must be a whole number >= 1, got {value!r}.")
    return site


def _validate_site_privacy(site: SiteConfig, p: str) -> None:
    """The site's own privacy rules: numbers in range, a known evaluation release."""
    pol, ev = site.privacy, site.privacy.evaluation
    for key, value in (
        ("max_epsilon", pol.max_epsilon),
        ("max_grad_norm", pol.max_grad_norm),
        ("count_noise", pol.count_noise),
    ):
        _positive(value, f"privacy.{key}", p)
    _positive(pol.min_noise_multiplier, "privacy.min_noise_multiplier", p, allow_zero=True)
    if not 0 < pol.delta < 1:
        raise ConfigError(f"{p}: 'privacy.delta' is {pol.delta}; use a probability in (0, 1), e.g. 1e-5.")
    _choice(pol.unit, ("auto", "patient", "image"), "privacy.unit", p)
    _choice(ev.release, ("dp_histogram", "summary", "exact"), "privacy.evaluation.release", p)
    if ev.max_images_per_patient < 1:
        raise ConfigError(
            f"{p}: 'privacy.evaluation.max_images_per_patient' must be >= 1, got {ev.max_images_per_patient}."
        )
    if ev.bins < 2 or ev.bins % 2:
        raise ConfigError(f"{p}: 'privacy.evaluation.bins' is {ev.bins}; use an even number >= 2, e.g. 16.")
    _positive(ev.noise, "privacy.evaluation.noise", p)
    _positive(ev.max_epsilon, "privacy.evaluation.max_epsilon", p)


def _validate_geometry(data: SiteDataConfig, p: str) -> None:
    pre = data.preprocess
    if pre.size and len(pre.size) != (3 if data.volume else 2):  # each side checked by _validate_preprocess
        shape = "[slices, height, width] (data.volume: true)" if data.volume else "[height, width]"
        raise ConfigError(f"{p}: 'data.preprocess.size' is {pre.size}; use {shape} or [].")
    if pre.spacing and (not data.volume or len(pre.spacing) != 3 or min(pre.spacing) <= 0):
        raise ConfigError(
            f"{p}: 'data.preprocess.spacing' is {pre.spacing}; it resamples volumes (data.volume: true) to "
            "[slice, row, col] millimetres, each > 0, e.g. [2.5, 1.0, 1.0]."
        )


def _validate_colour(data: SiteDataConfig, p: str) -> None:
    _choice(data.colour, ("grey", "rgb"), "data.colour", p)
    if data.volume and data.format not in ("dicom", "nifti", "synthetic"):
        raise ConfigError(
            f"{p}: 'data.volume' reads DICOM series and NIfTI volumes, not format {data.format}."
        )
    if data.volume and data.colour == "rgb":
        raise ConfigError(f"{p}: 'data.colour' rgb is for 2-D images; volumes are read grey.")
    if data.colour == "rgb" and data.format == "nifti":
        raise ConfigError(
            f"{p}: 'data.colour' rgb is for dicom, image and medmnist; NIfTI volumes are read grey."
        )
    if data.colour == "rgb" and data.preprocess.channels != 3:
        raise ConfigError(
            f"{p}: 'data.colour' is rgb but 'data.preprocess.channels' is {data.preprocess.channels}; colour "
            "images have 3 channels: set data.preprocess.channels: 3 (or data.colour: grey)."
        )


def preprocess_config(doc: Any, where: str, path: str) -> PreprocessConfig:
    """A `preprocess` mapping read from a file (a site config's, or a model package's): every key
    known, typed and in range, else a ConfigError naming `where` in `path`."""
    pre = _from_dict(PreprocessConfig, doc, where, path)
    _validate_preprocess(pre, where, path)
    return pre


def _validate_preprocess(pre: PreprocessConfig, where: str, p: str) -> None:
    if pre.size and (len(pre.size) not in (2, 3) or min(pre.size) < 1 or max(pre.size) > MAX_INPUT_SIDE):
        raise ConfigError(
            f"{p}: '{where}.size' is {pre.size}; use [height, width] ([slices, height, width] for volumes), "
            f"each from 1 to {MAX_INPUT_SIDE} pixels, or []."
        )
    _choice(pre.spatial, ("resize", "fit", "crop_or_pad"), f"{where}.spatial", p)
    _choice(pre.normalize, NORMALIZE_MODES, f"{where}.normalize", p)
    if pre.percentiles and (
        len(pre.percentiles) != 2 or not 0 <= pre.percentiles[0] < pre.percentiles[1] <= 100
    ):
        raise ConfigError(
            f"{p}: '{where}.percentiles' is {pre.percentiles}; use [low, high] with "
            f"0 <= low < high <= 100, e.g. [0.5, 99.5], or []."
        )
    if pre.channels not in (1, 3):
        raise ConfigError(f"{p}: '{where}.channels' is {pre.channels}; use 1 or 3.")


def _validate_site_data(data: SiteDataConfig, p: str) -> None:
    """The data settings of a site config that can be checked without reading any image."""
    pre, aug = data.preprocess, data.augment
    if data.format in ("dicom", "image", "nifti"):
        for key in ("root", "labels"):
            if not getattr(data, key):
                raise ConfigError(f"{p}: 'data.{key}' is empty; format {data.format} needs it.")
        if len(data.classes) < 2 or len(set(data.classes)) != len(data.classes):
            raise ConfigError(
                f"{p}: 'data.classes' is {data.classes}; list the study's labels (two or more, no "
                f"repeats) in the order of the study's classes, e.g. [normal, pneumonia]."
            )
    if data.window and (len(data.window) != 2 or data.window[1] <= 0):
        raise ConfigError(
            f"{p}: 'data.window' is {data.window}; use [center, width] with width > 0 in modality "
            f"units (e.g. [40, 400] for a CT soft-tissue window), or [] for the file's own window."
        )
    if data.window and data.format == "image":
        raise ConfigError(
            f"{p}: 'data.window' applies to dicom and nifti; PNG/JPEG images are already grey levels."
        )
    _validate_colour(data, p)
    frame = data.frame
    if isinstance(frame, bool) or not (
        (isinstance(frame, int) and frame >= 0) or frame in ("first", "middle", "last")
    ):
        raise ConfigError(f"{p}: 'data.frame' is {frame!r}; use a 0-based index or first, middle, last.")
    fr = data.split_fractions
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6 or fr[0] == 0 or fr[2] == 0:
        raise ConfigError(
            f"{p}: 'data.split_fractions' is {fr}; use [train, val, test], each >= 0 (train and "
            f"test > 0), adding up to 1, e.g. [0.7, 0.15, 0.15]."
        )
    _validate_preprocess(pre, "data.preprocess", p)
    _validate_geometry(data, p)
    if not 0 <= aug.prob <= 1:
        raise ConfigError(f"{p}: 'data.augment.prob' is {aug.prob}; use a probability in [0, 1].")
    if any(a not in (0, 1) for a in aug.flip) or len(set(aug.flip)) != len(aug.flip):
        raise ConfigError(
            f"{p}: 'data.augment.flip' is {aug.flip}; list axes 0 (up-down) and/or 1 (left-right)."
        )
    if aug.zoom and (len(aug.zoom) != 2 or not 0 < aug.zoom[0] <= aug.zoom[1]):
        raise ConfigError(
            f"{p}: 'data.augment.zoom' is {aug.zoom}; use [min, max] with 0 < min <= max, or []."
        )
    for key in ("rotate_deg", "intensity", "noise_std"):
        _positive(getattr(aug, key), f"data.augment.{key}", p, allow_zero=True)
