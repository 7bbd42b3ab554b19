"""Site data: the synthetic multi-site set, MedMNIST partitions, and the scanner-like shifts.

Every site computes its own share independently from its site config (seed, index, number of sites),
so a simulated site never needs another site's images. Images are float32 tensors N x C x H x W in
[0, 1]; labels are int64.

The synthetic set: each image is a soft "organ" on a smooth background; positive images carry a
small bright finding inside the organ. Sites differ in acquisition (gain, offset, gamma, blur, noise,
via MONAI transforms) and in class prevalence, so they are different populations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import AdjustContrast, GaussianSmooth

from common.config import SiteConfig, SitePartition
from common.sources import FOLDER_FORMATS, load_folder_site


class SiteDataError(ValueError):
    """A site's data cannot be used: the message names the site, the file and what to do."""


@dataclass
class SiteData:
    site: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


# ----------------------------------------------------------------------------- acquisition


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner renders an image: out = gain * contrast(blur(x), gamma) + offset + noise."""

    gain: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    blur: float = 0.0  # Gaussian sigma in pixels
    noise: float = 0.0  # noise standard deviation (image range 0..1)
    prevalence: float = 0.5  # synthetic only: share of positive images


SCANNERS = (
    Scanner(gain=1.00, offset=0.00, gamma=1.00, blur=0.0, noise=0.03, prevalence=0.50),
    Scanner(gain=0.80, offset=0.10, gamma=1.40, blur=0.8, noise=0.06, prevalence=0.30),
    Scanner(gain=1.15, offset=-0.05, gamma=0.75, blur=0.0, noise=0.10, prevalence=0.65),
    Scanner(gain=0.90, offset=0.05, gamma=1.20, blur=1.2, noise=0.04, prevalence=0.40),
    Scanner(gain=1.05, offset=-0.02, gamma=0.90, blur=0.5, noise=0.08, prevalence=0.55),
)


def scanner_for(index: int) -> Scanner:
    return SCANNERS[index % len(SCANNERS)]


def acquire(images: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Render N x H x W images in [0, 1] the way `scanner` would (MONAI smoothing and contrast)."""
    if images.size == 0:
        return images.astype(np.float32)
    x = torch.as_tensor(images, dtype=torch.float32)
    if scanner.blur > 0:
        x = GaussianSmooth(sigma=scanner.blur)(x)  # channel-first: each image smoothed in H, W
    x = AdjustContrast(gamma=scanner.gamma)(x.clamp(0, 1))
    out = scanner.gain * np.asarray(x) + scanner.offset
    out = out + rng.normal(0.0, scanner.noise, size=out.shape) if scanner.noise > 0 else out
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- synthetic


def synthetic_images(
    n: int, prevalence: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Clean synthetic images (before acquisition) and their labels (1 = finding present)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    labels = (rng.random(n) < prevalence).astype(np.int64)
    imgs = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.4, 0.6, 2)
        ry, rx = rng.uniform(0.25, 0.38, 2)
        organ = np.exp(-((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 2))
        bg = sum(
            rng.uniform(0.03, 0.08)
            * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * yy + rng.random()))
            * np.cos(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.random()))
            for _ in range(3)
        )
        img = 0.25 + 0.45 * organ + bg
        if labels[i]:
            r, a = rng.uniform(0, 0.6), rng.uniform(0, 2 * np.pi)
            fy, fx = cy + r * ry * np.sin(a), cx + r * rx * np.cos(a)
            sigma = rng.uniform(0.06, 0.09)
            img = img + rng.uniform(0.35, 0.5) * np.exp(-((yy - fy) ** 2 + (xx - fx) ** 2) / (2 * sigma**2))
        imgs[i] = img
    return np.clip(imgs, 0, 1), labels


def synthetic_site(config: SiteConfig) -> SiteData:
    part, syn = config.data.partition, config.data.synthetic
    scanner = scanner_for(part.index)
    rng = np.random.default_rng([part.seed, part.index, 7])
    splits = {}
    for split, n in (("train", syn.train_per_site), ("test", syn.test_per_site)):
        clean, labels = synthetic_images(n, scanner.prevalence, syn.image_size, rng)
        splits[split] = (acquire(clean, scanner, rng), labels)
    return _site_data(config.site, splits, ["normal", "finding"])


# ----------------------------------------------------------------------------- MedMNIST


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
    labels = {s: data[f"{s}_labels"].reshape(-1).astype(np.int64) for s in splits_present}
    idx = partition_indices(labels, part)
    rng = np.random.default_rng([part.seed, part.index, 11])
    splits = {}
    for s in splits_present:
        imgs = data[f"{s}_images"][idx[s]].astype(np.float32) / 255.0
        if imgs.ndim == 4:  # colour MedMNIST sets: N x H x W x 3 -> grey
            imgs = imgs.mean(axis=-1)
        if part.acquisition_shift:
            imgs = acquire(imgs, scanner_for(part.index), rng)
        splits[s] = (imgs, labels[s][idx[s]])
    n_classes = int(max(labels["train"].max(), labels["test"].max()) + 1)
    classes = config.data.classes or [str(c) for c in range(n_classes)]
    return _site_data(config.site, splits, classes)


def _site_data(site: str, splits: dict, classes: list[str]) -> SiteData:
    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)

    val = splits.get("val")
    return SiteData(
        site=site,
        train_x=t(splits["train"][0]),
        train_y=torch.from_numpy(splits["train"][1]),
        test_x=t(splits["test"][0]),
        test_y=torch.from_numpy(splits["test"][1]),
        val_x=t(val[0]) if val else None,
        val_y=torch.from_numpy(val[1]) if val else None,
        classes=classes,
    )


LOADERS = {
    "synthetic": synthetic_site,
    "medmnist": medmnist_site,
    **dict.fromkeys(FOLDER_FORMATS, load_folder_site),
}


def load_site_data(config: SiteConfig) -> SiteData:
    """Load a site's data and check that it can train: raises SiteDataError naming the site."""
    fmt = config.data.format
    if fmt not in LOADERS:
        raise SiteDataError(f"site '{config.site}': data format '{fmt}' is not supported yet.")
    data = LOADERS[fmt](config)
    if len(data.train_y) == 0:
        raise SiteDataError(
            f"site '{config.site}' has no training images ({config.data.format} data"
            f"{' at ' + config.data.path if config.data.path else ''}); give it data or leave it "
            f"out of the study."
        )
    return data
