"""The config schema: typed dataclasses for a study config and a site config, with their defaults.

A *study config* (configs/*.yaml) is read once on the coordinator; it says what to train, how, for how
many rounds, and, in simulation, which sites exist. A *site config* lives at a hospital and holds the
site's own facts: its data and its privacy policy, which the coordinator cannot override.

Reading them from YAML, strictly, is `common.config`'s job; this module only says what they hold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The choices some keys allow, here so that loading a config needs neither torch nor Opacus.
MODEL_NAMES = ("cnn28", "cnn28-small", "cnn28-wide", "cnn28-ws", "scatternet", "resnet10", "resnet18",
               "densenet121", "efficientnet-b0", "cnn3d", "cnn3d-ws", "resnet10-3d", "unet", "unet-3d")  # fmt: skip
SEGMENTATION_MODELS = ("unet", "unet-3d")  # networks that give a label map: task segmentation
VOLUME_MODELS = ("cnn3d", "cnn3d-ws", "resnet10-3d", "unet-3d")  # 3-D networks: input [slices, height, width]
MIN_INPUT_SIZE = {"densenet121": 32, "efficientnet-b0": 32}  # networks for large images need >= this
NORMALIZE_MODES = ("none", "minmax", "zscore")  # per-image intensity normalization (common.transforms)
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")  # Opacus's per-sample gradient modes
DEFAULT_GRAD_SAMPLE_MODE = "hooks"  # the fastest on cnn28 (bench/bench_dp_overhead.py)

# ----------------------------------------------------------------------------- study config


class ConfigError(ValueError):
    """A config file or value a user can fix: the message names the file, the key and the fix."""


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
    val_per_site: int = 100  # drawn after train and test (they are the same with or without it)
    image_size: int = 28
    colour: bool = False  # RGB images whose finding only colour shows (common.synthetic)
    depth: int = 0  # > 0: volumes of this many slices with a 3-D finding (common.synthetic); 0: 2-D images
    masks: bool = (
        False  # the segmentation variant: each image's lesion mask as its label (task: segmentation)
    )


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
    # per-image intensity standardization of the simulated sites' images (synthetic, medmnist): none |
    # zscore (each image to mean 0, sd 1) | minmax; a hospital's site config sets data.preprocess.normalize
    normalize: str = "none"


@dataclass
class ModelConfig:
    name: str = "cnn28"  # see common.models.MODELS
    init_from: str = ""  # a model package to start round 1 from (server.packages); "" = fresh weights
    # a package trained on other data (public, or fedward's synthetic images; never a site's): its weights
    # of the same names and shapes start the model, the rest fresh; classes may differ (server.packages)
    pretrained: str = ""


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
    # augmentation multiplicity (De et al., 2022): each image augmented this many times per step; with
    # privacy its views' gradients are averaged before clipping (one clipped contribution per image)
    augment_views: int = 1
    # harmonization: re-render each training image as another scanner might (common.transforms.
    # acquisition_transforms: blur, gamma, gain, offset, noise), on top of the other augmentation
    acquisition_augment: bool = False
    # DP: large logical batches (batch_size) computed in physical batches of at most this many images
    # (Opacus's BatchMemoryManager); 0: one physical batch per logical one
    max_physical_batch: int = 0


SERVER_LR_DEFAULTS = {"fedadam": 0.01, "fedavgm": 1.0}


@dataclass
class StrategyConfig:
    # fedavg | fedprox | fedadam | fedavgm (Flower's own strategies) | scaffold (server.scaffold)
    name: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term
    # the coordinator's step: fedadam's eta, fedavgm's server learning rate; 0: the strategy's default
    # (SERVER_LR_DEFAULTS)
    server_lr: float = 0.0
    server_momentum: float = 0.9  # fedavgm: momentum of the coordinator's step over the rounds
    server_lr_local: float = 0.01  # fedadam: eta_l (only logged by Flower)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    # FedBN-style personalization: each site keeps its normalization layers' affine parameters (they are
    # trained there and never sent back), the rest is federated (client.local_norm)
    local_norm: bool = False
    # parameter averaging: the model evaluated and packaged is the moving average of the global models,
    # average = ema_decay x average + (1 - ema_decay) x the round's (0: off); post-processing, no privacy cost
    ema_decay: float = 0.0
    # how FedAvg (and FedProx, FedAdam, FedAvgM, SCAFFOLD) weighs the sites' updates: by their training images
    # (`examples`, McMahan et al.'s FedAvg) or each site once (`sites`), so a small site counts as much as a large one
    weighting: str = "examples"


@dataclass
class PrivacyConfig:
    enabled: bool = False
    target_epsilon: float = 8.0  # for the whole study, per site
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0  # 0: derive from target_epsilon over rounds x local epochs
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE  # one of GRAD_SAMPLE_MODES
    poisson_sampling: bool = True  # sites train only with Poisson sampling: false is refused


@dataclass
class SimulationConfig:
    client_cpus: int = 0  # CPU cores per simulated site; 0: all cores (sites run one at a time)
    client_gpus: float = -1.0  # GPU share per simulated site; -1: 1.0 when a GPU is present


@dataclass
class ComparisonConfig:
    """`fedward study` (server/study/): what runs beside the federated study, on the same sites."""

    compare_privacy: bool = False  # also federate (and train locally) the other way: with / without DP
    local: bool = True  # each site alone: rounds x local_epochs epochs, same lr schedule and DP budget
    centralized: bool = True  # all training data pooled on one machine (the upper reference)
    leave_one_out: bool = True  # for each site k: federate without k, test on k (needs >= 2 sites)
    bootstrap_samples: int = 1000  # resamples per 95% confidence interval (stratified by class)
    calibration_bins: int = 10  # equal-width bins of the expected calibration error
    # personalization (issue 16): a federation in which each site keeps its normalization parameters
    # (FedBN-style, strategy.local_norm), and the federated model fine-tuned at each site for this many
    # epochs (0: not), under the site's budget when private; each site's best model chosen on its
    # validation images
    fedbn: bool = False
    fine_tune_epochs: int = 0


@dataclass
class OperatingPointConfig:
    """How the decision threshold of a binary model is chosen, on the sites' validation data (never
    their test data): `youden` (sensitivity + specificity - 1 at its largest), `sensitivity` (the
    highest specificity with sensitivity >= target) or `specificity` (the reverse)."""

    rule: str = "youden"  # youden | sensitivity | specificity | none (arg-max, 0.5)
    target: float = 0.95


@dataclass
class InputConfig:
    """What the model takes: the study's own statement (common.model_spec), from which the coordinator
    builds the model without reading any site's data, which every site checks its data against before
    it trains, and which the package carries to the hospitals."""

    channels: int = 0  # 1 (grey) or 3 (colour); 0: the data source's own (synthetic, MedMNIST), else 1
    size: list[int] = field(
        default_factory=list
    )  # [H, W] or [D, H, W]; []: the data source's own, not checked for sites
    spacing: list[float] = field(default_factory=list)  # volumes: [slice, row, col] mm the sites resample to
    # DICOM Modality codes the model is for (CR, DX, US, CT, ...); a file of another modality is
    # predicted but marked. Empty: the MedMNIST data set's own modality; none known: not checked.
    modalities: list[str] = field(default_factory=list)


@dataclass
class StudyConfig:
    name: str = "study"
    seed: int = 0
    rounds: int = 5
    min_sites: int = 2  # a round needs this many sites; fewer ends the study, saying why
    round_timeout_s: float = 900.0
    task: str = "classification"  # what the model does (common.model_spec.TASKS)
    classes: list[str] = field(default_factory=list)  # []: the data source's own (synthetic, MedMNIST)
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    study: ComparisonConfig = field(default_factory=ComparisonConfig)
    operating_point: OperatingPointConfig = field(default_factory=OperatingPointConfig)
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

    size: list[int] = field(
        default_factory=lambda: [128, 128]
    )  # [H, W], or [D, H, W] for volumes; [] keeps the files' size
    spacing: list[float] = field(
        default_factory=list
    )  # volumes: [slice, row, col] mm to resample to first; []: as stored
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
    # grey: every image grey (colour files become BT.601 luma; the site check counts them) | rgb: colour
    # kept, 3 channels (a grey file is then a bad file); needs preprocess.channels 3
    colour: str = "grey"
    volume: bool = False  # 3-D: a DICOM series (the sheet's `file` names its folder) or a whole NIfTI volume
    frame: int | str = "middle"  # multi-frame DICOM / NIfTI volume: 0-based index, first, middle, last
    split_seed: int = 0  # patients are drawn into train/val/test with this seed
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train, val, test
    cache: bool = True  # keep decoded, preprocessed images in <state_dir>/cache
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    partition: SitePartition = field(default_factory=SitePartition)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class EvaluationPolicyConfig:
    """What a site's evaluations release (its site config's `privacy.evaluation`)."""

    # dp_histogram: score histograms (`bins` logit-spaced bins per class) and, with more than two
    #   classes, the confusion matrix, each count with Gaussian noise (std `noise` x the release's
    #   sensitivity), charged to the evaluation budget in the ledger; the coordinator computes the
    #   metrics from them (differentially private, per test image)
    # summary: the site's metrics alone (AUC, accuracy, sensitivity, specificity): exact, NOT private
    #   against a coordinator that crafts the models it asks the site to evaluate; no pooled metrics
    # exact: exact aggregates (2000-bin histograms, confusion matrix): they can reveal single test
    #   images' labels; the default of the sites a simulation makes from a study config
    release: str = "dp_histogram"
    bins: int = 16
    noise: float = 2.0
    max_epsilon: float = 10.0  # the evaluation budget: test images, kept apart from training images
    # with patient-level privacy: at most this many of a patient's test images are evaluated, and the
    # release's sensitivity is this many images
    max_images_per_patient: int = 4


@dataclass
class SitePolicyConfig:
    """The site's own privacy rules (its site config's `privacy` section); the coordinator cannot change them."""

    required: bool = True  # train only with differential privacy; false: non-private studies may train here
    # the unit of privacy: auto (a patient, where the data has patient ids; else an image) | patient | image
    unit: str = "auto"
    max_epsilon: float = 10.0  # the most this site's data may ever spend, over every study
    delta: float = 1e-5  # epsilon is counted at this delta; requests may not exceed it
    min_noise_multiplier: float = 0.5  # refuse rounds with less noise
    max_grad_norm: float = 1.0  # refuse rounds with a larger clipping norm
    # std of the Gaussian noise on the training-set size the site releases once per study (FedAvg's
    # weight and the site's sample rate come from it), charged to the ledger like a training round
    count_noise: float = 10.0
    # simulation only: noise and batch sampling seeded from the round, so runs repeat; such rounds are
    # NOT private against the coordinator (who knows the seed) and are marked so in ledger and results
    repeatable_noise: bool = False
    evaluation: EvaluationPolicyConfig = field(default_factory=EvaluationPolicyConfig)


@dataclass
class RoundLimitsConfig:
    """How much work one round may ask of the site (its site config's `limits`), whatever the
    coordinator sends: a round beyond them is refused, so that no study holds the site (and, training
    privately, its ledger's lock, which every other study waits for) for ever."""

    max_local_epochs: int = 100  # passes over the site's training data in one round
    max_augment_views: int = 32  # augmented views of each image per step (augmentation multiplicity)
    # images (views included) one step computes at once: batch size x views, or a private round's
    # physical batch (train.max_physical_batch) x views; memory grows with it (DP-SGD keeps a gradient
    # per image: images x the model's parameters x 4 bytes), so a site with a large model lowers it
    max_step_images: int = 2048
    # a patient-level site's steps take at most this many images of a drawn patient (a fresh random
    # choice each step), so a step's images are at most batch (patients) x this x views
    max_images_per_patient: int = 32


@dataclass
class ServiceConfig:
    """Where the site service (`fedward site serve`) listens for the ClientApp Flower starts."""

    socket: str = ""  # the Unix socket; "" = <state_dir>/site.sock
    group: str = ""  # the OS group allowed to connect (the ClientApp's user); "" = the service's user only


@dataclass
class SiteConfig:
    site: str = "site"
    data: SiteDataConfig = field(default_factory=SiteDataConfig)
    privacy: SitePolicyConfig = field(default_factory=SitePolicyConfig)
    limits: RoundLimitsConfig = field(default_factory=RoundLimitsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    state_dir: str = ""  # privacy ledger and image cache; "" = none (a private round is then refused)
    source_path: str = ""
