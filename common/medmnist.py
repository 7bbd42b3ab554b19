"""MedMNIST `.npz` files, read directly (no `medmnist` package), and their partition among simulated sites.

Every simulated site computes its own indices from its site config (seed, index, number of sites),
so all sites of a study agree on the split without talking to each other.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from common.known_data import KNOWN_CLASS_COUNTS, KNOWN_CLASSES
from common.readers.base import luma
from common.scanners import acquire, scanner_for
from common.schema import SiteConfig, SitePartition
from common.sitedata import SiteData, SiteDataError, site_data_from_arrays
from common.transforms import normalize_images


@functools.lru_cache(maxsize=4)
def load_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of a MedMNIST .npz file (cached per process: every simulated site shares it)."""
    p = Path(path)
    if not p.is_file():
        raise SiteDataError(
            f"MedMNIST file '{p}' does not exist; point the study's data_dir (or FEDWARD_DATA, or "
            f"--data-dir) at the folder that holds it."
        )
    try:
        with np.load(p) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as err:  # a truncated or foreign file: numpy's error is not enough
        raise SiteDataError(f"'{p}' is not a readable .npz file ({err}); download it again.") from err
    missing = [f"{s}_{k}" for s in ("train", "test") for k in ("images", "labels") if f"{s}_{k}" not in data]
    if missing:
        raise SiteDataError(f"'{p}' lacks the MedMNIST arrays {missing}; is it a MedMNIST file?")
    return data


def npz_classes(path: str, data: dict[str, np.ndarray], configured: list[str]) -> list[str]:
    """The class names of a MedMNIST file's labels, checked: every label a whole number in 0..K-1, where
    K is the site's `classes` list when given, the set's known count, or else the labels' own range
    (which must then have training images of every class). Raises SiteDataError naming the file."""
    name = Path(path).stem.lower()
    labels = {k: data[k].reshape(-1) for k in data if k.endswith("_labels")}
    for key, y in labels.items():
        whole = np.issubdtype(y.dtype, np.integer) or bool(np.all(np.mod(y, 1) == 0))
        if y.size and (not whole or y.min() < 0):
            raise SiteDataError(f"'{path}': {key} holds values that are not class numbers 0, 1, ...; "
                                "the labels must be whole numbers from 0.")  # fmt: skip
    top = int(max((int(y.max()) for y in labels.values() if y.size), default=0))
    expected = len(configured) or KNOWN_CLASS_COUNTS.get(name, 0)
    if expected and top >= expected:
        past = sorted({int(v) for y in labels.values() for v in np.unique(y) if v >= expected})
        source = "the site's classes list" if configured else f"{name} (a MedMNIST set of {expected} classes)"
        raise SiteDataError(
            f"'{path}': labels {past} run past the {expected} classes of {source}; labels must be 0..{expected - 1}. "
            "Is it the right file, or does the config's data.classes need more names?"
        )
    n = expected or top + 1
    present = set(np.unique(labels.get("train_labels", np.zeros(0))).astype(int).tolist())
    missing = [c for c in range(n) if c not in present]
    if not expected and missing:
        raise SiteDataError(
            f"'{path}': its labels run to {top} but classes {missing} have no training image; labels must be "
            "0..K-1 with every class present (or list the classes in the config's data.classes)."
        )
    return configured or KNOWN_CLASSES.get(name) or [str(c) for c in range(n)]


def _shares(n: int, props: np.ndarray) -> np.ndarray:
    """How many of n items each site gets for these proportions (rounded cumulative bounds)."""
    return np.diff(np.concatenate([[0], np.round(np.cumsum(props) * n).astype(int)]))


def partition_indices(labels: dict[str, np.ndarray], part: SitePartition) -> dict[str, np.ndarray]:
    """This site's indices into each split. Label skew uses one Dirichlet draw per class, applied
    alike to train, val and test, so a site with few positives in training has few in test."""
    rng = np.random.default_rng([part.seed, 1234])
    n_sites = part.num_sites
    classes = np.unique(labels["train"])
    if part.scheme == "iid":
        props = np.full((len(classes), n_sites), 1.0 / n_sites)
    else:
        test = labels.get("test", np.zeros(0, dtype=np.int64))
        for _ in range(1000):
            props = rng.dirichlet(np.full(n_sites, part.alpha), size=len(classes))
            train = np.sum(
                [_shares((labels["train"] == c).sum(), props[i]) for i, c in enumerate(classes)], axis=0
            )
            tests = [_shares((test == c).sum(), props[i]) for i, c in enumerate(classes)]
            if (
                train.min() >= part.min_train_per_site
                and min(t.min() for t in tests) >= part.min_test_per_class
            ):
                break
        else:
            raise SiteDataError(
                f"no label-skew split with alpha={part.alpha} gives every one of {n_sites} sites "
                f"{part.min_train_per_site} training images and {part.min_test_per_class} test images of "
                "every class; raise alpha, lower those minimums or the number of sites."
            )
    out = {}
    for split, y in labels.items():
        mine = []
        for i, c in enumerate(classes):
            idx = np.flatnonzero(y == c)
            idx = idx[np.random.default_rng([part.seed, 99, i, len(y)]).permutation(len(idx))]
            bounds = np.concatenate([[0], np.cumsum(_shares(len(idx), props[i]))])
            mine.append(idx[bounds[part.index] : bounds[part.index + 1]])
        out[split] = np.sort(np.concatenate(mine))
    return out


def medmnist_site(config: SiteConfig) -> SiteData:
    data = load_npz(config.data.path)
    part = config.data.partition
    splits_present = [s for s in ("train", "val", "test") if f"{s}_images" in data]
    classes = npz_classes(config.data.path, data, config.data.classes)
    labels = {s: data[f"{s}_labels"].reshape(-1).astype(np.int64) for s in splits_present}
    idx = partition_indices(labels, part)
    rng = np.random.default_rng([part.seed, part.index, 11])
    splits = {}
    for s in splits_present:
        imgs = data[f"{s}_images"][idx[s]].astype(np.float32) / 255.0
        if imgs.ndim == 4:  # colour MedMNIST sets, N x H x W x 3: kept (data.colour rgb) or grey (BT.601)
            imgs = imgs.transpose(0, 3, 1, 2)
            imgs = np.ascontiguousarray(imgs) if config.data.colour == "rgb" else luma(imgs)
        elif config.data.preprocess.channels == 3:  # grey repeated for a 3-channel network
            imgs = np.repeat(imgs[:, None], 3, axis=1)
        if part.acquisition_shift:
            imgs = acquire(imgs, scanner_for(part.index), rng)
        splits[s] = (normalize_images(imgs, config.data.preprocess), labels[s][idx[s]])
    return site_data_from_arrays(config.site, splits, classes)
