"""Differential-privacy settings both sides share: what the coordinator asks, and how it is counted.

The coordinator sends a `PrivacyRequest` to every site each round inside the round's ConfigRecord
(`to_config` / `from_config`); each site checks it against its own policy (`client.policy`)
before it trains. Epsilon is always counted with Opacus's RDP accountant over the whole study: noise
from `derive_noise_multiplier` must be given the study's total number of steps, not one round's.

    >>> request = PrivacyRequest(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    >>> PrivacyRequest.from_config(request.to_config()) == request
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")

# One accountant step group, as Opacus's RDPAccountant.history holds it.
HistoryItem = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class IncompatibleModelError(ValueError):
    """The model cannot be trained with Opacus, even after `ModuleValidator.fix`."""


class PrivacyConfigError(ValueError):
    """A privacy setting (from a study config or a ConfigRecord) is missing or out of range."""


class PrivacyKey(StrEnum):
    """Keys of the privacy settings inside the coordinator's per-round ConfigRecord.

    Prefixed with `dp-` so they can share one ConfigRecord with the training keys.
    """

    NOISE_MULTIPLIER = "dp-noise-multiplier"
    MAX_GRAD_NORM = "dp-max-grad-norm"
    DELTA = "dp-delta"
    TARGET_EPSILON = "dp-target-epsilon"  # absent when the study sets the noise directly
    GRAD_SAMPLE_MODE = "dp-grad-sample-mode"
    POISSON_SAMPLING = "dp-poisson-sampling"
    SECURE_MODE = "dp-secure-mode"


def make_opacus_compatible(model: torch.nn.Module) -> torch.nn.Module:
    """Return a copy of `model` that Opacus can train: BatchNorm becomes GroupNorm, and so on.

    `ModuleValidator.fix` replaces the layers it knows how to replace, deterministically, so the
    coordinator and every site that fix the same architecture get the same state_dict keys and
    shapes. In-place operations on layer outputs, which Opacus's hooks cannot train through, are
    made out-of-place (same weights, same outputs). The result is then validated (in training
    mode; the mode is restored afterwards).

    Raises:
        IncompatibleModelError: a layer that Opacus cannot fix remains; the message lists
            Opacus's own reasons.
    """
    fixed = ModuleValidator.fix(model)
    _remove_inplace_ops(fixed)
    was_training = fixed.training
    fixed.train()
    try:
        ModuleValidator.validate(fixed, strict=True)
    except UnsupportedModuleError as e:
        errors = e.args[0] if e.args and isinstance(e.args[0], list) else [e]
        reasons = "\n".join(f"  - {err}" for err in errors)
        raise IncompatibleModelError(
            f"{type(model).__name__} cannot be trained with differential privacy, even after "
            f"opacus.validators.ModuleValidator.fix:\n{reasons}\n"
            "Replace these layers (e.g. BatchNorm -> GroupNorm, LSTM -> opacus.layers.DPLSTM, "
            "no frozen-statistics layers) or choose another model in the study config."
        ) from e
    finally:
        fixed.train(was_training)
    return fixed


def _remove_inplace_ops(model: torch.nn.Module) -> None:
    """Stop in-place writes to the outputs of trainable layers; weights and keys are unchanged.

    Opacus computes per-sample gradients with full backward hooks, and PyTorch forbids modifying a
    hooked layer's output in place ("Output 0 of BackwardHookFunctionBackward is a view and is
    being modified inplace", pytorch/pytorch#61519). `ModuleValidator.validate` does not catch
    this; training fails at its first step. So activations with `inplace=True` become
    out-of-place, and MONAI's ResNet blocks (`out += residual`) get an out-of-place forward.
    """
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
        if type(module) in _OUT_OF_PLACE:
            module.__class__ = _OUT_OF_PLACE[type(module)]


def _resnet_forward(block: ResNetBlock | ResNetBottleneck, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ResNetBlock / ResNetBottleneck forward, with `out + residual` instead of `+=`."""
    convs = 3 if isinstance(block, ResNetBottleneck) else 2
    out = x
    for i in range(1, convs + 1):
        out = getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(out))
        if i < convs:
            out = block.act(out)
    residual = x if block.downsample is None else block.downsample(x)
    return block.act(out + residual)


class OutOfPlaceResNetBlock(ResNetBlock):
    """monai.networks.nets.resnet.ResNetBlock that Opacus's backward hooks can train."""

    forward = _resnet_forward


class OutOfPlaceResNetBottleneck(ResNetBottleneck):
    """monai.networks.nets.resnet.ResNetBottleneck that Opacus's backward hooks can train."""

    forward = _resnet_forward


_OUT_OF_PLACE: dict[type, type] = {
    ResNetBlock: OutOfPlaceResNetBlock,
    ResNetBottleneck: OutOfPlaceResNetBottleneck,
}


@dataclass(frozen=True, kw_only=True)
class PrivacyRequest:
    """The DP settings the coordinator asks a site to train one round with."""

    noise_multiplier: float  # Gaussian noise std / max_grad_norm; the site may demand more
    max_grad_norm: float  # per-sample clipping bound (L2)
    delta: float  # the delta epsilon is reported at; well below 1 / (examples at a site)
    target_epsilon: float | None = None  # the study's whole-study target, for reports only
    grad_sample_mode: str = "ghost"  # how Opacus gets per-sample gradient norms
    poisson_sampling: bool = True  # False breaks the assumptions of the RDP accountant
    secure_mode: bool = False  # cryptographically secure noise; needs torchcsprng

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyConfigError(
                f"noise_multiplier must be > 0, got {self.noise_multiplier}: "
                "without noise there is no differential privacy"
            )
        if not self.max_grad_norm > 0:
            raise PrivacyConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyConfigError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyConfigError(
                f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                f"got {self.grad_sample_mode!r}"
            )

    def to_config(self) -> dict[str, int | float | str | bool]:
        """The settings as ConfigRecord values (kebab-case keys; an unset target is left out)."""
        config: dict[str, int | float | str | bool] = {
            PrivacyKey.NOISE_MULTIPLIER: float(self.noise_multiplier),
            PrivacyKey.MAX_GRAD_NORM: float(self.max_grad_norm),
            PrivacyKey.DELTA: float(self.delta),
            PrivacyKey.GRAD_SAMPLE_MODE: self.grad_sample_mode,
            PrivacyKey.POISSON_SAMPLING: self.poisson_sampling,
            PrivacyKey.SECURE_MODE: self.secure_mode,
        }
        if self.target_epsilon is not None:
            config[PrivacyKey.TARGET_EPSILON] = float(self.target_epsilon)
        return {str(k): v for k, v in config.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> PrivacyRequest:
        """Read the settings back from a ConfigRecord (other keys in it are ignored).

        Raises:
            PrivacyConfigError: a required key is missing or a value has the wrong type.
        """

        def number(key: PrivacyKey, *, required: bool = True) -> float | None:
            if key not in config:
                if required:
                    raise PrivacyConfigError(
                        f"the round's config has no {key!r}: the coordinator must send it "
                        "(PrivacyRequest.to_config)"
                    )
                return None
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PrivacyConfigError(f"{key!r} must be a number, got {value!r}")
            return float(value)

        def flag(key: PrivacyKey, default: bool) -> bool:
            value = config.get(key, default)
            if not isinstance(value, bool):
                raise PrivacyConfigError(f"{key!r} must be true or false, got {value!r}")
            return value

        mode = config.get(PrivacyKey.GRAD_SAMPLE_MODE, "ghost")
        if not isinstance(mode, str):
            raise PrivacyConfigError(f"{PrivacyKey.GRAD_SAMPLE_MODE!r} must be text, got {mode!r}")
        return cls(
            noise_multiplier=number(PrivacyKey.NOISE_MULTIPLIER),
            max_grad_norm=number(PrivacyKey.MAX_GRAD_NORM),
            delta=number(PrivacyKey.DELTA),
            target_epsilon=number(PrivacyKey.TARGET_EPSILON, required=False),
            grad_sample_mode=mode,
            poisson_sampling=flag(PrivacyKey.POISSON_SAMPLING, True),
            secure_mode=flag(PrivacyKey.SECURE_MODE, False),
        )


def rdp_epsilon(history: Sequence[HistoryItem], *, delta: float) -> float:
    """Epsilon spent by `history` at `delta`: what a fresh Opacus RDPAccountant holding this history
    gives (0.0 if empty), computed faster.

    Opacus computes the RDP curve of every history entry anew, about 0.1 s each at large sample
    rates, so a ledger of many rounds took seconds per question, asked several times a round. The
    RDP of the subsampled Gaussian is linear in the number of steps, so entries with the same (noise,
    sample rate) are summed into one and each (noise, sample rate) curve is computed once per process
    (cached). Same formulas, same orders, same conversion to epsilon as Opacus's accountant.
    """
    steps: dict[tuple[float, float], int] = {}
    for nm, q, s in history:
        key = (float(nm), float(q))
        steps[key] = steps.get(key, 0) + int(s)
    if not any(steps.values()):
        return 0.0
    rdp = sum(n * _rdp_per_step(nm, q) for (nm, q), n in steps.items())
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.flags.writeable = False  # shared by every caller
    return rdp


@functools.lru_cache(maxsize=64)  # a pure function, asked again every round by every site
def derive_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_total: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier that keeps the WHOLE study within (target_epsilon, delta).

    `steps_total` is rounds x local epochs x steps per epoch: every step a site takes in the study,
    since the budget is spent over all of them. With Poisson sampling, steps per epoch is
    1 / sample_rate (sample_rate = batch size / examples at the site).

    Raises:
        PrivacyConfigError: an argument is out of range, or no noise level reaches the target.
    """
    if not target_epsilon > 0:
        raise PrivacyConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps_total < 1:
        raise PrivacyConfigError(f"steps_total must be >= 1, got {steps_total}")
    try:
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=int(steps_total),
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    except ValueError as e:
        raise PrivacyConfigError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} over "
            f"{steps_total} steps at sample rate {sample_rate} ({e}); raise the target epsilon "
            "or train fewer rounds / epochs"
        ) from e
    assert math.isfinite(sigma) and sigma > 0, sigma
    return float(sigma)
