"""fedward's own synthetic hospitals: the default data of demos and fast tests, no download needed.

Each image is a soft "organ" on a smooth background; positive images carry a small bright finding
inside the organ. Sites differ in acquisition (common.scanners) and in class prevalence, so they are
different populations. Every site computes its own share from its site config (seed, index), so a
simulated site never needs another site's images.
"""

from __future__ import annotations

import numpy as np

from common.scanners import acquire, scanner_for
from common.schema import SiteConfig
from common.sitedata import SiteData, site_data_from_arrays

CLASSES = ["normal", "finding"]


def synthetic_images(
    n: int, prevalence: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Clean synthetic images (before acquisition) and their labels (1 = finding present)."""
    imgs, labels, _ = synthetic_images_with_findings(n, prevalence, size, rng)
    return imgs, labels


def synthetic_images_with_findings(
    n: int, prevalence: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """synthetic_images plus where each finding was drawn: n x 3 (row, col, sigma) in pixels, NaN for
    images without one (what a test of an explanation's location needs)."""
    findings = np.full((n, 3), np.nan)
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
            findings[i] = (fy * (size - 1), fx * (size - 1), sigma * (size - 1))
        imgs[i] = img
    return np.clip(imgs, 0, 1), labels, findings


def synthetic_site(config: SiteConfig) -> SiteData:
    part, syn = config.data.partition, config.data.synthetic
    scanner = scanner_for(part.index)
    rng = np.random.default_rng([part.seed, part.index, 7])
    splits = {}
    for split, n in (("train", syn.train_per_site), ("test", syn.test_per_site), ("val", syn.val_per_site)):
        if split == "val" and n == 0:  # no validation split
            continue
        clean, labels = synthetic_images(n, scanner.prevalence, syn.image_size, rng)
        splits[split] = (acquire(clean, scanner, rng), labels)
    return site_data_from_arrays(config.site, splits, list(CLASSES))
