"""Differential-privacy settings both sides share: what the coordinator asks, and how it is counted.

The coordinator asks for privacy in every round's ConfigRecord; `request_config(study.privacy)` is the
one place those keys (`PrivacyKey`) are made. A site reads them back with
`PrivacyRequest.from_config(config, sample_rate=..., steps_total=...)`, deriving the noise for the
whole study when the coordinator names none, then checks the request against its own policy
(`client.policy`) before it trains. Epsilon is always counted with Opacus's RDP accountant over
every step a site has taken (`rdp_epsilon`).

    config = request_config(study.privacy)            # coordinator
    request = PrivacyRequest.from_config(config, sample_rate=0.05, steps_total=200)   # site
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from common.schema import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, PrivacyConfig

# One accountant step group, as Opacus's RDPAccountant.history holds it.
HistoryItem = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class PrivacyConfigError(ValueError):
    """A privacy setting (from a study config or a ConfigRecord) is missing or out of range."""


class PrivacyKey(StrEnum):
    """Keys of the privacy settings inside the coordinator's per-round ConfigRecord.

    Prefixed with `dp-` so they can share one ConfigRecord with the training keys.
    """

    NOISE_MULTIPLIER = "dp-noise-multiplier"  # absent: each site derives it from the target
    MAX_GRAD_NORM = "dp-max-grad-norm"
    DELTA = "dp-delta"
    TARGET_EPSILON = "dp-target-epsilon"
    GRAD_SAMPLE_MODE = "dp-grad-sample-mode"
    POISSON_SAMPLING = "dp-poisson-sampling"


def request_config(privacy: PrivacyConfig) -> dict[str, int | float | str | bool]:
    """The coordinator's privacy request for a round, as ConfigRecord values.

    With `privacy.noise_multiplier` 0 no noise is named: each site derives its own for the whole
    planned study at its own sample rate (`PrivacyRequest.from_config`).
    """
    config: dict[str, int | float | str | bool] = {
        PrivacyKey.MAX_GRAD_NORM: float(privacy.max_grad_norm),
        PrivacyKey.DELTA: float(privacy.delta),
        PrivacyKey.TARGET_EPSILON: float(privacy.target_epsilon),
        PrivacyKey.GRAD_SAMPLE_MODE: privacy.grad_sample_mode,
        PrivacyKey.POISSON_SAMPLING: privacy.poisson_sampling,
    }
    if privacy.noise_multiplier > 0:
        config[PrivacyKey.NOISE_MULTIPLIER] = float(privacy.noise_multiplier)
    return {str(k): v for k, v in config.items()}


@dataclass(frozen=True, kw_only=True)
class PrivacyRequest:
    """The DP settings the coordinator asks a site to train one round with."""

    noise_multiplier: float  # Gaussian noise std / max_grad_norm; the site may demand more
    max_grad_norm: float  # per-sample clipping bound (L2)
    delta: float  # the delta epsilon is reported at; well below 1 / (examples at a site)
    target_epsilon: float | None = None  # the study's whole-study target, for reports only
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE  # how Opacus gets per-sample gradients
    poisson_sampling: bool = True  # False breaks the assumptions of the RDP accountant: sites refuse it

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

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, object],
        *,
        sample_rate: float,
        steps_total: int,
        fixed: tuple[HistoryItem, ...] = (),
    ) -> PrivacyRequest:
        """The request in a round's ConfigRecord (other keys are ignored). Without a noise multiplier
        the noise is derived for `steps_total` steps at `sample_rate` (the whole planned study at this
        site), together with the study's `fixed` other releases, to stay within the target epsilon.

        Raises:
            PrivacyConfigError: a required key is missing or a value has the wrong type.
        """

        mode = config.get(PrivacyKey.GRAD_SAMPLE_MODE, DEFAULT_GRAD_SAMPLE_MODE)
        if not isinstance(mode, str):
            raise PrivacyConfigError(f"{PrivacyKey.GRAD_SAMPLE_MODE!r} must be text, got {mode!r}")
        delta = _number(config, PrivacyKey.DELTA)
        target = _number(config, PrivacyKey.TARGET_EPSILON, required=False)
        noise = _number(config, PrivacyKey.NOISE_MULTIPLIER, required=False)
        if noise is None:
            if target is None:
                raise PrivacyConfigError(
                    f"the round's config names neither {PrivacyKey.NOISE_MULTIPLIER!r} nor "
                    f"{PrivacyKey.TARGET_EPSILON!r}: the site cannot tell how much noise to add"
                )
            noise = derive_noise_multiplier(
                target_epsilon=target,
                delta=delta,
                sample_rate=sample_rate,
                steps_total=steps_total,
                fixed=fixed,
            )
        return cls(
            noise_multiplier=noise,
            max_grad_norm=_number(config, PrivacyKey.MAX_GRAD_NORM),
            delta=delta,
            target_epsilon=target,
            grad_sample_mode=mode,
            poisson_sampling=_flag(config, PrivacyKey.POISSON_SAMPLING, True),
        )


def _number(config: Mapping[str, object], key: PrivacyKey, *, required: bool = True) -> float | None:
    if key not in config:
        if required:
            raise PrivacyConfigError(
                f"the round's config has no {key!r}: the coordinator must send it (common.privacy.request_config)"
            )
        return None
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyConfigError(f"{key!r} must be a number, got {value!r}")
    return float(value)


def _flag(config: Mapping[str, object], key: PrivacyKey, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise PrivacyConfigError(f"{key!r} must be true or false, got {value!r}")
    return value


UNBOUNDED = "unbounded"  # an epsilon no DP bounds (images released without privacy), as files hold it


def reported(epsilon: float | None) -> float | str | None:
    """An epsilon as results and study files hold it: the number, or UNBOUNDED for infinity (JSON has
    no infinity, and null already means "not reported")."""
    return UNBOUNDED if epsilon is not None and math.isinf(epsilon) else epsilon


def epsilon_value(epsilon: float | str | None) -> float | None:
    """A reported epsilon back as a number (UNBOUNDED: infinity)."""
    return math.inf if epsilon == UNBOUNDED else epsilon


def epsilon_text(epsilon: float | str | None, digits: int = 2) -> str:
    """A reported epsilon for a person: the number, "unbounded", or "" when none was reported."""
    if epsilon is None:
        return ""
    return UNBOUNDED if epsilon_value(epsilon) == math.inf else f"{epsilon:.{digits}f}"


def rdp_epsilon(history: Sequence[HistoryItem], *, delta: float) -> float:
    """Epsilon spent by `history` at `delta`: what a fresh Opacus RDPAccountant holding this history
    gives (0.0 if empty; infinity when an entry has no noise), computed faster.

    Opacus computes the RDP curve of every history entry anew, about 0.1 s each at large sample
    rates, so a ledger of many rounds took seconds per question, asked several times a round. The
    RDP of the subsampled Gaussian is linear in the number of steps, so entries with the same (noise,
    sample rate) are summed into one and each (noise, sample rate) curve is computed once per process
    (cached). Same formulas, same orders, same conversion to epsilon as Opacus's accountant.
    """
    if any(float(nm) == 0 and int(s) > 0 for nm, _, s in history):
        return math.inf  # a release without noise: no epsilon bounds it
    steps: dict[tuple[float, float], int] = {}
    for nm, q, s in history:
        key = (float(nm), float(q))
        steps[key] = steps.get(key, 0) + int(s)
    if not any(steps.values()):
        return 0.0
    rdp = sum(n * _rdp_per_step(nm, q) for (nm, q), n in steps.items())
    analysis, orders = _opacus_rdp()
    eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _opacus_rdp():
    """Opacus's RDP analysis and its accountant's orders, imported when a step is first counted, so
    that a process that never counts one (a non-private study's coordinator and sites) does not pay
    Opacus's import (about a second)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    return rdp, RDPAccountant.DEFAULT_ALPHAS


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    analysis, orders = _opacus_rdp()
    rdp = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)
    rdp.flags.writeable = False  # shared by every caller
    return rdp


@functools.lru_cache(maxsize=64)  # a pure function, asked again every round by every site
def derive_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_total: int,
    fixed: tuple[HistoryItem, ...] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier that keeps the WHOLE study within (target_epsilon, delta).

    `steps_total` is rounds x local epochs x steps per epoch: every step a site takes in the study,
    since the budget is spent over all of them. `fixed` are releases of the study that do not depend
    on the training noise (a site's noised count), counted with it. The result's epsilon lies in
    [target - epsilon_tolerance, target], found by bisection on `rdp_epsilon` (Opacus's RDP analysis,
    as Opacus's own `get_noise_multiplier` does).

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

    def epsilon(sigma: float) -> float:
        return rdp_epsilon([*fixed, (sigma, sample_rate, int(steps_total))], delta=delta)

    if rdp_epsilon(list(fixed), delta=delta) >= target_epsilon:
        raise PrivacyConfigError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta}: the study's other "
            "releases alone spend it; raise the target epsilon or the site's count_noise"
        )
    low, high = 0.0, 10.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise PrivacyConfigError(
                f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} over "
                f"{steps_total} steps at sample rate {sample_rate}; raise the target epsilon or train "
                "fewer rounds / epochs"
            )
    for _ in range(200):  # epsilon(high) <= target < epsilon(low); halves the gap each time
        sigma = (low + high) / 2
        eps = epsilon(sigma)
        if eps <= target_epsilon:
            high = sigma
            if target_epsilon - eps < epsilon_tolerance:
                break
        else:
            low = sigma
    return float(high)
