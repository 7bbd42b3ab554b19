"""Record keys: the one place where the names of what travels between coordinator and sites live.

Every Message fedward sends or receives uses these keys, so a typo is an AttributeError, not a
silently missing value. Values are kebab-case strings, as Flower's own records use.
"""

from enum import StrEnum


class Rec(StrEnum):
    """Names of the records inside a Message's RecordDict."""

    ARRAYS = "arrays"  # ArrayRecord: model weights (Flower strategies' default key)
    CONFIG = "config"  # ConfigRecord: what the coordinator asks for this round
    METRICS = "metrics"  # MetricRecord: aggregate numbers a site sends back
    SITE = "site"  # ConfigRecord: the site's name and, when it refuses, why


# SCAFFOLD (server.scaffold): the coordinator's per-site drift correction travels beside the global
# model's arrays, each under this prefix and the parameter's name (client.scaffold_correction takes them out)
CORRECTION_PREFIX = "scaffold-correction/"


class Cfg(StrEnum):
    """Keys of the coordinator's per-round ConfigRecord."""

    SERVER_ROUND = "server-round"  # set by Flower's strategies
    LOCAL_EPOCHS = "local-epochs"
    BATCH_SIZE = "batch-size"
    LR = "lr"
    OPTIMIZER = "optimizer"
    PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
    MODEL = "model"
    NUM_CLASSES = "num-classes"
    IN_CHANNELS = "in-channels"
    SEED = "seed"
    AUGMENT = "augment"
    CLASS_BALANCE = "class-balance"  # class-weighted loss, weights from the site's own labels
    STUDY_ID = "study-id"  # name + run id: rounds in a site's privacy ledger are kept per study
    DP_ENABLED = "dp-enabled"  # the other privacy keys: common.privacy.PrivacyKey
    PLANNED_ROUNDS = "planned-rounds"  # for deriving the noise of the whole study at the site
    EVAL_SPLIT = "eval-split"  # test (default) | val: the split an evaluation runs on (operating points)
    TASK = "task"  # the study's model (common.model_spec): each site checks it against its data
    CLASSES = "classes"
    SIZE = "size"
    LOCAL_NORM = "local-norm"  # FedBN-style: each site keeps its normalization layers' parameters
    AUGMENT_VIEWS = "augment-views"  # augmentation multiplicity (client.train.expand_views)
    ACQUISITION_AUGMENT = "acquisition-augment"  # harmonization (common.transforms.acquisition_transforms)
    MAX_PHYSICAL_BATCH = "max-physical-batch"  # DP: memory-bounded physical batches (client.train)


class Met(StrEnum):
    """Keys of the MetricRecords sites send back."""

    NUM_EXAMPLES = "num-examples"  # the weight Flower's strategies aggregate by (noised with privacy)
    TRAIN_LOSS = "train-loss"
    TRAIN_S = "train-s"
    EVAL_S = "eval-s"
    N_TEST = "n-test"
    AUC = "auc"
    ACCURACY = "accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    BALANCED_ACCURACY = "balanced-accuracy"
    EPSILON = "epsilon"  # cumulative, over every round in the site's privacy ledger
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise-multiplier"
    STEPS = "steps"
    SAMPLE_RATE = "sample-rate"
    PRIVACY_UNIT = "privacy-unit"  # 1: a patient (patient-level DP), 0: an image
    REPEATABLE_NOISE = "repeatable-noise"  # 1: the round's noise was seeded (not private vs the coordinator)
    CONFUSION = "confusion"  # flattened C x C confusion matrix (counts; noised with dp_histogram)
    SCORE_HIST = "score-hist"  # flattened K x 2 x B histograms of scores (counts; see common.metrics)
    EVAL_NOISE = "eval-noise"  # dp_histogram: std of the Gaussian noise on every released count
    EVAL_BINS = "eval-bins"  # dp_histogram: the number of logit-spaced score bins
    # segmentation (common.seg_metrics), per foreground class: sums and counts of Dice and HD95; with
    # dp_histogram noised, HD95 clipped to EVAL_HD_CAP and released divided by it
    DICE_SUM = "dice-sum"
    DICE_N = "dice-n"
    HD95_SUM = "hd95-sum"
    HD95_N = "hd95-n"
    EVAL_HD_CAP = "eval-hd-cap"
    EVAL_EPSILON = "eval-epsilon"  # dp_histogram: the site's evaluation epsilon, all its evaluations
    # not sent by sites: the coordinator sets it to 1 on every usable update (`strategy.weighting: sites`)
    SITE_WEIGHT = "site-weight"


class Site(StrEnum):
    """Keys of the site's ConfigRecord in a reply."""

    NAME = "name"
    REFUSED = "refused"  # non-empty: the reason the site did not train (or evaluate)
    RELEASE = "release"  # an evaluation's release: dp_histogram | summary | exact (client.evaluation)
    INPUT = "input"  # a train reply: how the site reads and prepares its images (JSON; no image data)
