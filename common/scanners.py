"""How a site's scanner renders an image: the acquisition shift between simulated hospitals.

`acquire(images, scanner, rng)` renders clean N x H x W images in [0, 1] as `scanner` would
(MONAI smoothing and contrast, then gain, offset and noise). Simulated sites i use `scanner_for(i)`:
the synthetic hospitals always, MedMNIST partitions with `data.partition.acquisition_shift`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import AdjustContrast, GaussianSmooth


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
    """Render N x H x W (or N x C x H x W colour) images in [0, 1] the way `scanner` would (MONAI
    smoothing and contrast, each channel as an image)."""
    if images.size == 0:
        return images.astype(np.float32)
    if images.ndim == 4:
        n, c = images.shape[:2]
        return acquire(images.reshape(n * c, *images.shape[2:]), scanner, rng).reshape(images.shape)
    x = torch.as_tensor(images, dtype=torch.float32)
    if scanner.blur > 0:
        x = GaussianSmooth(sigma=scanner.blur)(x)  # channel-first: each image smoothed in H, W
    x = AdjustContrast(gamma=scanner.gamma)(x.clamp(0, 1))
    out = scanner.gain * np.asarray(x) + scanner.offset
    out = out + rng.normal(0.0, scanner.noise, size=out.shape) if scanner.noise > 0 else out
    return np.clip(out, 0.0, 1.0).astype(np.float32)
