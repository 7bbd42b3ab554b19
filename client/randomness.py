"""Where a site's randomness comes from: secret for private training, repeatable only where allowed.

DP-SGD's guarantee needs noise and batch sampling that nobody else can predict: a coordinator that
knows the seed can regenerate the noise and subtract it, and privacy amplification by subsampling
assumes the batches are secret. So a private round draws a fresh 64-bit seed from the operating
system's entropy (`secrets`) for each of its generators, never from anything the coordinator sends
or could know, and never touches torch's global generator.

`RoundRandomness.repeatable(seed, round)` seeds them from the round instead: for non-private rounds
(nothing to protect), and for private rounds only where a site config says `privacy.repeatable_noise:
true` (simulations and benchmarks that must repeat); such rounds are marked in the ledger and in
results.json as not private against the coordinator.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


def secret_seed() -> int:
    """64 bits of the operating system's entropy."""
    return secrets.randbits(64)


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class RoundRandomness:
    """The generators of one round: batch sampling, DP noise, augmentation (and a released count)."""

    sampling: torch.Generator  # batch order, or Poisson batch membership with DP
    noise: torch.Generator  # Opacus's Gaussian noise (on the model's device)
    augment: torch.Generator  # the random augmentation of training batches
    release: torch.Generator  # the noise on a released count (the site's training-set size)
    repeatable: bool  # seeded from the round: predictable by whoever knows the seed

    @classmethod
    def secret(cls, device: torch.device | str = "cpu") -> RoundRandomness:
        return cls(
            sampling=_generator(secret_seed()),
            noise=_generator(secret_seed(), device),
            augment=_generator(secret_seed()),
            release=_generator(secret_seed()),
            repeatable=False,
        )

    @classmethod
    def repeatable(cls, seed: int, round_: int, device: torch.device | str = "cpu") -> RoundRandomness:
        base = seed * 1000 + round_
        return cls(
            sampling=_generator(base),
            noise=_generator(base + 7_919_000, device),  # its own stream, whatever the sampler drew
            augment=_generator(base),
            release=_generator(base + 15_838_000),
            repeatable=True,
        )
