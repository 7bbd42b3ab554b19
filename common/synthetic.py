"""fedward's own synthetic hospitals: the default data of demos and fast tests, no download needed.

Each image is a soft "organ" on a smooth background; positive images carry a small bright finding
inside the organ. The colour variant (`data.synthetic.colour`) tints the organ like a fundus
photograph and draws the finding as a change of hue at equal luma (redder, less green): a site that
reads it in grey sees no finding at all, so only a model that keeps colour can learn it. Sites differ in acquisition (common.scanners) and in class prevalence, so they are
different populations. Every site computes its own share from its site config (seed, index), so a
simulated site never needs another site's images.
"""

from __future__ import annotations

import numpy as np

from common.known_data import SYNTHETIC_CLASSES, SYNTHETIC_SEGMENTATION_CLASSES
from common.readers.base import LUMA, luma
from common.scanners import acquire, scanner_for
from common.schema import SiteConfig
from common.sitedata import SiteData, site_data_from_arrays
from common.transforms import normalize_images

TINT = np.array([0.6, 0.45, 0.3], dtype=np.float32)  # the colour variant's organ: orange-red
ISOLUMINANT = np.array([1.0, -LUMA[0] / LUMA[1], 0.0], dtype=np.float32)  # its BT.601 luma: 0


def synthetic_images(
    n: int, prevalence: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Clean synthetic images (before acquisition) and their labels (1 = finding present)."""
    imgs, labels, _ = synthetic_images_with_findings(n, prevalence, size, rng)
    return imgs, labels


def synthetic_images_with_findings(
    n: int, prevalence: float, size: int, rng: np.random.Generator, *, colour: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """synthetic_images plus where each finding was drawn: n x 3 (row, col, sigma) in pixels, NaN for
    images without one (what a test of an explanation's location needs). With `colour` the images are
    n x 3 x H x W RGB (the module docstring), drawn from the same random numbers."""
    findings = np.full((n, 3), np.nan)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    labels = (rng.random(n) < prevalence).astype(np.int64)
    imgs = np.empty((n, 3, size, size) if colour else (n, size, size), dtype=np.float32)
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
        if colour:
            img = img[None] * TINT[:, None, None]
        if labels[i]:
            r, a = rng.uniform(0, 0.6), rng.uniform(0, 2 * np.pi)
            fy, fx = cy + r * ry * np.sin(a), cx + r * rx * np.cos(a)
            sigma = rng.uniform(0.06, 0.09)
            blob = rng.uniform(0.35, 0.5) * np.exp(-((yy - fy) ** 2 + (xx - fx) ** 2) / (2 * sigma**2))
            img = img + (0.5 * blob[None] * ISOLUMINANT[:, None, None] if colour else blob)
            findings[i] = (fy * (size - 1), fx * (size - 1), sigma * (size - 1))
        imgs[i] = img
    return np.clip(imgs, 0, 1), labels, findings


def synthetic_volumes_with_findings(
    n: int, prevalence: float, depth: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 3-D variant (`data.synthetic.depth`): n x D x H x W volumes of a soft ellipsoid organ on a
    smooth background; positives carry a small bright 3-D finding inside it. Also where each finding
    was drawn: n x 4 (slice, row, col, sigma in pixels), NaN without one."""
    findings = np.full((n, 4), np.nan)
    zz, yy, xx = np.mgrid[0:depth, 0:size, 0:size].astype(np.float32)
    zz, yy, xx = zz / max(depth - 1, 1), yy / (size - 1), xx / (size - 1)
    labels = (rng.random(n) < prevalence).astype(np.int64)
    vols = np.empty((n, depth, size, size), dtype=np.float32)
    for i in range(n):
        c = rng.uniform(0.4, 0.6, 3)
        r = rng.uniform(0.28, 0.4, 3)
        organ = np.exp(
            -((((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) ** 2)
        )
        bg = rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * yy + rng.random() + zz))
        vol = 0.25 + 0.45 * organ + bg
        if labels[i]:
            d = rng.normal(size=3)
            f = c + rng.uniform(0, 0.5) * r * d / np.linalg.norm(d)
            sigma = rng.uniform(0.08, 0.11)
            vol = vol + rng.uniform(0.3, 0.45) * np.exp(
                -((zz - f[0]) ** 2 + (yy - f[1]) ** 2 + (xx - f[2]) ** 2) / (2 * sigma**2)
            )
            findings[i] = (f[0] * (depth - 1), f[1] * (size - 1), f[2] * (size - 1), sigma * (size - 1))
        vols[i] = vol
    return np.clip(vols, 0, 1), labels, findings


def synthetic_site(config: SiteConfig) -> SiteData:
    part, syn = config.data.partition, config.data.synthetic
    scanner = scanner_for(part.index)
    rng = np.random.default_rng([part.seed, part.index, 7])
    splits = {}
    for split, n in (("train", syn.train_per_site), ("test", syn.test_per_site), ("val", syn.val_per_site)):
        if split == "val" and n == 0:  # no validation split
            continue
        if syn.masks and syn.depth:  # 3-D segmentation: N x 1 x D x H x W volumes, N x D x H x W masks
            clean, labels, findings = synthetic_volumes_with_findings(
                n, scanner.prevalence, syn.depth, syn.image_size, rng
            )
            splits[split] = (
                acquire(clean, scanner, rng)[:, None],
                lesion_masks_3d(findings, syn.depth, syn.image_size),
            )
            continue
        if syn.masks:  # segmentation: the label is the finding's mask (where it is over half its peak)
            clean, labels, findings = synthetic_images_with_findings(
                n, scanner.prevalence, syn.image_size, rng
            )
            splits[split] = (acquire(clean, scanner, rng), lesion_masks(findings, syn.image_size))
            continue
        if syn.depth:  # volumes: N x 1 x D x H x W, each slice acquired as an image
            clean, labels, _ = synthetic_volumes_with_findings(
                n, scanner.prevalence, syn.depth, syn.image_size, rng
            )
            splits[split] = (acquire(clean, scanner, rng)[:, None], labels)
            continue
        clean, labels, _ = synthetic_images_with_findings(
            n, scanner.prevalence, syn.image_size, rng, colour=syn.colour
        )
        images = acquire(clean, scanner, rng)
        if syn.colour and config.data.colour == "grey":  # the site reads its colour images in grey
            images = luma(images)
        elif not syn.colour and config.data.preprocess.channels == 3:  # grey repeated for a 3-channel net
            images = np.repeat(images[:, None], 3, axis=1)
        splits[split] = (normalize_images(images, config.data.preprocess), labels)
    named = (
        list(config.data.classes) if len(config.data.classes) == 2 else []
    )  # a site may name its two classes
    return site_data_from_arrays(
        config.site, splits, named or list(SYNTHETIC_SEGMENTATION_CLASSES if syn.masks else SYNTHETIC_CLASSES)
    )


def lesion_masks_3d(findings: np.ndarray, depth: int, size: int) -> np.ndarray:
    """N x D x H x W label maps of the volumes' findings (slice, row, col, sigma in row pixels): 1 above
    half the finding's peak. A volume's slices are spaced as its rows scaled to the depth."""
    zz, yy, xx = np.mgrid[0:depth, 0:size, 0:size].astype(np.float64)
    z_scale = (size - 1) / max(depth - 1, 1)  # the generator's unit cube: a slice is this many row pixels
    masks = np.zeros((len(findings), depth, size, size), dtype=np.int64)
    for i, (z, r, c, sigma) in enumerate(findings):
        if np.isfinite(z):
            d2 = ((zz - z) * z_scale) ** 2 + (yy - r) ** 2 + (xx - c) ** 2
            masks[i] = d2 <= (sigma * np.sqrt(2 * np.log(2))) ** 2
    return masks


def lesion_masks(findings: np.ndarray, size: int) -> np.ndarray:
    """N x H x W int64 label maps: 1 where a drawn finding is above half its peak (within
    sigma x sqrt(2 ln 2) of its centre), 0 elsewhere and in images without one."""
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((len(findings), size, size), dtype=np.int64)
    for i, (r, c, sigma) in enumerate(findings):
        if np.isfinite(r):
            masks[i] = (yy - r) ** 2 + (xx - c) ** 2 <= (sigma * np.sqrt(2 * np.log(2))) ** 2
    return masks
