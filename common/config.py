"""Study and site configuration: typed dataclasses read strictly from YAML.

A *study config* (configs/*.yaml) is read once on the coordinator; it says what to train, how, for how
many rounds, and, in simulation, which sites exist. A *site config* lives at a hospital and holds the
site's own facts: its data and its privacy policy, which the coordinator cannot override.

Unknown keys, wrong types and impossible values raise `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "FEDWARD_DATA"  # overrides `data.data_dir` of a study config


class ConfigError(ValueError):
    """A config file or value a user can fix: the message names the file, the key and the fix."""


# ----------------------------------------------------------------------------- study config


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # iid | label_skew: how each class's images are divided among sites
    alpha: float = 0.5  # Dirichlet concentration for label_skew: smaller = more skewed
    acquisition_shift: bool = False  # each site's images look as if from a different scanner
    min_train_per_site: int = 20  # redraw the Dirichlet split until every site has this many
    min_test_per_class: int = 0  # ... and this many test images of every class (per-site AUC needs both)
    seed: int | None = None  # seed of the split; None: the study's seed


@dataclass
class SyntheticConfig:
    train_per_site: int = 300
    test_per_site: int = 150
    image_size: int = 28


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | medmnist | sites (one site config file per site)
    num_sites: int = 3
    site_names: list[str] = field(default_factory=list)  # default: hospital-a, hospital-b, ...
    dataset: str = ""  # medmnist: pneumoniamnist | breastmnist | any <name>.npz in data_dir
    data_dir: str = ""  # medmnist: folder of the .npz files (FEDWARD_DATA / --data-dir override)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    site_configs: list[str] = field(default_factory=list)  # source=sites: site config YAML paths


@dataclass
class ModelConfig:
    name: str = "cnn28"  # see common.models.MODELS


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay: float = 1.0  # the learning rate of round r is lr * lr_decay ** (r - 1)
    optimizer: str = "adam"  # adam | sgd
    augment: bool = False  # random flips and small shifts during local training
    # weight each class's loss by n / (classes x n_class), counted on the training images where the
    # model trains (each site its own); not with privacy (the weights would depend on every sample)
    class_balance: bool = False


@dataclass
class StrategyConfig:
    name: str = "fedavg"  # fedavg | fedprox | fedadam (Flower's own strategies)
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term
    server_lr: float = 0.01  # fedadam: eta, the server-side learning rate
    server_lr_local: float = 0.01  # fedadam: eta_l (only logged by Flower)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3


@dataclass
class PrivacyConfig:
    enabled: bool = False
    target_epsilon: float = 8.0  # for the whole study, per site
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0  # 0: derive from target_epsilon over rounds x local epochs
    grad_sample_mode: str = "hooks"  # hooks | ghost | functorch | ew (hooks measured fastest on cnn28)
    poisson_sampling: bool = True
    secure_mode: bool = False


@dataclass
class SimulationConfig:
    client_cpus: int = 0  # CPU cores per simulated site; 0: all cores (sites run one at a time)
    client_gpus: float = -1.0  # GPU share per simulated site; -1: 1.0 when a GPU is present


@dataclass
class ComparisonConfig:
    """`fedward study` (server/study.py): what runs beside the federated study, on the same sites."""

    compare_privacy: bool = False  # also federate (and train locally) the other way: with / without DP
    local: bool = True  # each site alone: rounds x local_epochs epochs, same lr schedule and DP budget
    centralized: bool = True  # all training data pooled on one machine (the upper reference)
    leave_one_out: bool = True  # for each site k: federate without k, test on k (needs >= 2 sites)
    bootstrap_samples: int = 1000  # resamples per 95% confidence interval (stratified by class)
    calibration_bins: int = 10  # equal-width bins of the expected calibration error


@dataclass
class StudyConfig:
    name: str = "study"
    seed: int = 0
    rounds: int = 5
    min_sites: int = 2  # a round needs this many sites; fewer ends the study, saying why
    round_timeout_s: float = 900.0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    study: ComparisonConfig = field(default_factory=ComparisonConfig)
    source_path: str = ""  # where this config was read from (set by the loader)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- site config


@dataclass
class SitePartition:
    """Which share of a shared data set a simulated site holds (computed the same at every site)."""

    index: int = 0
    num_sites: int = 1
    scheme: str = "iid"
    alpha: float = 0.5
    acquisition_shift: bool = False
    min_train_per_site: int = 20
    min_test_per_class: int = 0
    seed: int = 0


@dataclass
class PreprocessConfig:
    """How each image becomes a model input: the same at training, evaluation and prediction
    (common.transforms). Order: scale to size, intensity (percentiles, normalize), pad or crop, channels."""

    size: list[int] = field(default_factory=lambda: [128, 128])  # [H, W]; [] keeps the files' size
    spatial: str = "resize"  # resize (stretch to size) | fit (keep aspect ratio, pad) | crop_or_pad
    percentiles: list[float] = field(default_factory=list)  # [low, high], e.g. [0.5, 99.5]: clip first
    normalize: str = "none"  # none | minmax (each image to [0, 1]) | zscore (each image to mean 0, sd 1)
    channels: int = 1  # 1, or 3 (the grey image repeated, for 3-channel networks)


@dataclass
class AugmentConfig:
    """Random changes to training images only (MONAI dictionary transforms); all off by default.
    Each transform that is switched on is applied to an image with probability `prob`."""

    prob: float = 0.5
    flip: list[int] = field(default_factory=list)  # axes to flip: 0 = up-down, 1 = left-right
    rotate_deg: float = 0.0  # rotate by up to +- this many degrees
    zoom: list[float] = field(default_factory=list)  # [min, max] zoom factor, e.g. [0.9, 1.1]
    intensity: float = 0.0  # scale by 1 + U(-x, x), then shift by U(-x, x)
    noise_std: float = 0.0  # standard deviation of added Gaussian noise


@dataclass
class SiteDataConfig:
    format: str = "synthetic"  # synthetic | medmnist | dicom | image | nifti
    path: str = ""  # medmnist: the .npz file
    root: str = ""  # dicom/image/nifti: folder of files (relative: to the site config's folder)
    labels: str = ""  # dicom/image/nifti: labels CSV (relative: to the site config's folder)
    classes: list[str] = field(default_factory=list)
    on_bad_file: str = "skip"  # skip (leave the file out, report it) | fail (the data cannot be used)
    window: list[float] = field(default_factory=list)  # [center, width] in modality units (CT: HU)
    frame: int | str = "middle"  # multi-frame DICOM / NIfTI volume: 0-based index, first, middle, last
    split_seed: int = 0  # patients are drawn into train/val/test with this seed
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train, val, test
    cache: bool = True  # keep decoded, preprocessed images in <state_dir>/cache
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    partition: SitePartition = field(default_factory=SitePartition)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SitePolicyConfig:
    max_epsilon: float = 10.0
    delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 1.0


@dataclass
class SiteConfig:
    site: str = "site"
    data: SiteDataConfig = field(default_factory=SiteDataConfig)
    privacy: SitePolicyConfig = field(default_factory=SitePolicyConfig)
    state_dir: str = ""  # ledger, accountant history, cache; "" = a temporary folder
    source_path: str = ""


# ----------------------------------------------------------------------------- strict loading


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
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from err
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
    if rounds:
        study.rounds = rounds
    if num_sites:
        study.data.num_sites = num_sites
        if len(study.data.site_names) > num_sites:
            study.data.site_names = study.data.site_names[:num_sites]
    if data_dir:
        study.data.data_dir = data_dir
    elif os.environ.get(DATA_ENV):
        study.data.data_dir = os.environ[DATA_ENV]
    validate_study(study)
    return study


def validate_study(study: StudyConfig) -> None:
    from common.models import MIN_INPUT_SIZE, MODELS  # late: models import torch

    p = study.source_path or "study config"
    _choice(study.data.source, ("synthetic", "medmnist", "sites"), "data.source", p)
    _choice(study.data.partition.scheme, ("iid", "label_skew"), "data.partition.scheme", p)
    _choice(study.model.name, tuple(MODELS), "model.name", p)
    _choice(study.strategy.name, ("fedavg", "fedprox", "fedadam"), "strategy.name", p)
    _choice(study.train.optimizer, ("adam", "sgd"), "train.optimizer", p)
    _choice(
        study.privacy.grad_sample_mode,
        ("ghost", "hooks", "functorch", "ew"),
        "privacy.grad_sample_mode",
        p,
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
    n = study.data.num_sites if study.data.source != "sites" else len(study.data.site_configs)
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
    size = None
    if study.data.source == "synthetic":
        size = study.data.synthetic.image_size
    elif study.data.source == "medmnist":
        from common.data import load_npz

        size = int(load_npz(str(medmnist_path(study)))["train_images"].shape[1])
    needed = MIN_INPUT_SIZE.get(study.model.name, 0)
    if size is not None and size < needed:
        raise ConfigError(
            f"{p}: 'model.name' {study.model.name} needs images of at least {needed}x{needed} pixels, "
            f"but this study's are {size}x{size}; use cnn28, resnet10 or resnet18 for small images."
        )
    if study.data.source == "sites" and not study.data.site_configs:
        raise ConfigError(f"{p}: 'data.source' is 'sites' but 'data.site_configs' is empty.")
    if study.privacy.enabled and study.strategy.name == "fedprox":
        raise ConfigError(
            f"{p}: 'strategy.name' fedprox is not available with privacy (its proximal term is not "
            f"clipped per sample); use fedavg or fedadam with 'privacy.enabled: true'."
        )
    if study.privacy.enabled and study.train.class_balance:
        raise ConfigError(
            f"{p}: 'train.class_balance' is not available with privacy: class weights counted on a "
            "site's data make every sample's gradient depend on the others, which DP-SGD's accounting "
            "does not cover; set 'train.class_balance: false' with 'privacy.enabled: true'."
        )
    if study.privacy.enabled and study.privacy.noise_multiplier < 0:
        raise ConfigError(f"{p}: 'privacy.noise_multiplier' must be >= 0 (0 derives it from target_epsilon).")


def medmnist_path(study: StudyConfig) -> Path:
    name = study.data.dataset
    return Path(study.data.data_dir or ".").expanduser().resolve() / (
        name if name.endswith(".npz") else f"{name}.npz"
    )


def site_names(study: StudyConfig) -> list[str]:
    n = study.data.num_sites
    names = list(study.data.site_names)
    names += [f"hospital-{chr(ord('a') + i)}" if i < 26 else f"site-{i + 1}" for i in range(len(names), n)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{study.source_path}: 'data.site_names' has duplicates: {names}.")
    return names


def simulated_sites(study: StudyConfig, state_root: str | Path | None = None) -> list[SiteConfig]:
    """The site configs of a simulated study, in partition order (site i is partition i).

    With `data.source: sites` each site is its own site config file. Otherwise the data of site i is
    partition i of the study's data set, and when `data.site_configs` is given, the i-th file's site
    name, privacy policy and state_dir apply to site i (its `data` section is not used). A site
    without a state_dir keeps its privacy ledger under `state_root/<site>`.
    """
    sites = _partition_sites(study) if study.data.source != "sites" else []
    base = Path(study.source_path).parent if study.source_path else Path.cwd()
    for i, path in enumerate(study.data.site_configs):
        own = load_site(path if Path(path).is_absolute() or Path(path).exists() else base / path)
        if study.data.source == "sites":
            sites.append(own)
        elif i < len(sites):
            sites[i].site, sites[i].privacy, sites[i].state_dir = own.site, own.privacy, own.state_dir
            sites[i].source_path = own.source_path
    for site in sites:
        if not site.state_dir and state_root is not None:
            site.state_dir = str(Path(state_root) / site.site)
    return sites


def _partition_sites(study: StudyConfig) -> list[SiteConfig]:
    sites = []
    for i, name in enumerate(site_names(study)):
        part = SitePartition(
            index=i,
            num_sites=study.data.num_sites,
            scheme=study.data.partition.scheme,
            alpha=study.data.partition.alpha,
            acquisition_shift=study.data.partition.acquisition_shift,
            min_train_per_site=study.data.partition.min_train_per_site,
            min_test_per_class=study.data.partition.min_test_per_class,
            seed=study.seed if study.data.partition.seed is None else study.data.partition.seed,
        )
        if study.data.source == "medmnist":
            data = SiteDataConfig(format="medmnist", path=str(medmnist_path(study)), partition=part)
        else:
            data = SiteDataConfig(format="synthetic", partition=part, synthetic=study.data.synthetic)
        sites.append(SiteConfig(site=name, data=data))
    return sites


def load_site(path: str | Path) -> SiteConfig:
    p = str(path)
    site = _from_dict(SiteConfig, _read_yaml(path, "site"), "", p)
    site.source_path = str(Path(path).resolve())
    _choice(site.data.format, ("synthetic", "medmnist", "dicom", "image", "nifti"), "data.format", p)
    _choice(site.data.on_bad_file, ("skip", "fail"), "data.on_bad_file", p)
    _validate_site_data(site.data, p)
    return site


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
    if pre.size and (len(pre.size) != 2 or min(pre.size) < 1):
        raise ConfigError(f"{p}: 'data.preprocess.size' is {pre.size}; use [height, width] or [].")
    _choice(pre.spatial, ("resize", "fit", "crop_or_pad"), "data.preprocess.spatial", p)
    _choice(pre.normalize, ("none", "minmax", "zscore"), "data.preprocess.normalize", p)
    if pre.percentiles and (
        len(pre.percentiles) != 2 or not 0 <= pre.percentiles[0] < pre.percentiles[1] <= 100
    ):
        raise ConfigError(
            f"{p}: 'data.preprocess.percentiles' is {pre.percentiles}; use [low, high] with "
            f"0 <= low < high <= 100, e.g. [0.5, 99.5], or []."
        )
    if pre.channels not in (1, 3):
        raise ConfigError(f"{p}: 'data.preprocess.channels' is {pre.channels}; use 1 or 3.")
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


def site_from_dict(data: dict, where: str = "site config") -> SiteConfig:
    return _from_dict(SiteConfig, data, "", where)
