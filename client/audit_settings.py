"""What one canary audit of a DP-SGD round is (client.audit runs it): its modes and settings.

Kept apart from client.audit, which needs torch and Opacus, so that `fedward audit --help` and the
command's option defaults cost nothing to import.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("secret", "no-noise", "seeded")  # the real machinery, and the two bugs it must catch


@dataclass(frozen=True)
class AuditSettings:
    """One audited round. The noise multiplier is derived so that the round's accounted epsilon is
    `epsilon` at `delta` for `sample_rate` and `steps`."""

    epsilon: float = 1.0  # the accounted epsilon the audited round is given
    delta: float = 1e-5
    beta: float = 0.05  # the lower bound holds with confidence 1 - beta
    canaries: int = 1000  # m
    steps: int = 8  # a multiple of 1 / sample_rate (whole epochs)
    sample_rate: float = 0.25  # each sample (and each included canary) joins a step's batch so often
    max_grad_norm: float = 1.0
    train_size: int = 32  # the synthetic site's training images (expected batch: train_size x rate)
    model: str = "cnn28-small"
    seed: int = 0  # the round's seed: known to the coordinator, like the model and the canaries
    training_round: int = 1  # the round number the seeded noise is drawn for
    # the attacker guesses k = fraction x m "in" and as many "out", for each fraction; the bound
    # reported is the best, each computed at beta / len(guesses) (a union bound over the choices)
    guesses: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)

    def __post_init__(self) -> None:
        batches = round(1 / self.sample_rate) if 0 < self.sample_rate <= 1 else 0
        if not batches or abs(batches * self.sample_rate - 1) > 1e-9:
            raise ValueError(f"sample_rate must be 1 / (a whole number of batches), got {self.sample_rate}")
        if self.steps < 1 or self.steps % batches:
            raise ValueError(
                f"steps must be a positive multiple of {batches} (whole epochs at sample rate "
                f"{self.sample_rate}), got {self.steps}"
            )
        if self.canaries < 2 or not all(0 < g <= 0.5 for g in self.guesses):
            raise ValueError(
                f"need at least 2 canaries and guess fractions in (0, 0.5], got {self.canaries} "
                f"and {self.guesses}"
            )
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")

    @property
    def epochs(self) -> int:
        return self.steps // round(1 / self.sample_rate)

    @property
    def expected_batch_size(self) -> float:
        return self.train_size * self.sample_rate
