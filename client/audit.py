"""An empirical privacy audit of one site's DP-SGD round that can fail: gradient canaries, one run.

The audit of Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023,
arXiv:2305.08846): m canaries, each put into the training data independently with probability 1/2;
an attacker who sees what the coordinator sees guesses "in" or "out" for r of them and abstains on
the rest. Under (eps, delta)-DP the paper's main theorem bounds the probability of its count of
correct guesses reaching v (Theorem 5.2 and Corollary 5.4 in the numbering of arXiv v1; its
Appendix D gives the code that computes the bound), so v correct guesses prove, with confidence 1 - beta, that the round is NOT
(eps, delta)-DP for any eps below `epsilon_lower_bound(m, r, v, delta=..., beta=...)`. A lower bound
above the epsilon the site's accountant reports means the machinery leaks more than it counts.

The audited round goes through the site's real DP machinery (client.dp.make_private, Poisson
sampling, Opacus's clipping and noise, client.randomness for the generators, client.train's loop) on
a small synthetic site. The canaries are white-box gradient canaries (where the paper's Dirac
canaries are single coordinates, these are random unit directions in parameter space, scaled to
the clipping norm): an included canary joins each step's batch with the round's sample rate, like a
training sample (its membership drawn from a generator of its own, from the OS's entropy), and its
gradient is added to the clipped gradient sum inside Opacus's step, just before the noise. Plain SGD at lr 1,
so the site's update is minus the sum over steps of the noised gradient averages. The attacker
scores canary i by the inner product of the update with its direction and guesses "in" for the k
highest scores and "out" for the k lowest.

Modes: `secret` (the site's real settings: must pass), `no-noise` (noise multiplier 1e-6 while the
accountant still counts the configured one: the audit must catch it) and `seeded` (noise seeded from
the round, `RoundRandomness.repeatable`: the attacker replays the round on data of its own, reads the
noise off its replay and subtracts it; the audit must catch it).

    result = audit_round("secret", AuditSettings(canaries=1000, steps=8))
    print(result.epsilon, result.lower_bound, result.passed)

Command line: `fedward audit` (server/audit_cli.py). Test: `pytest tests/client/test_audit.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from scipy import optimize, stats
from torch import nn

from client.audit_settings import MODES, AuditSettings
from client.dp import PoissonPlan, make_private
from client.randomness import RoundRandomness, secret_seed
from client.train import device, train_epochs, train_loader
from common.data import load_site_data
from common.models import build_model
from common.privacy import derive_noise_multiplier, rdp_epsilon
from common.schema import SiteConfig, SiteDataConfig, SitePartition, SyntheticConfig

BROKEN_NOISE = 1e-6  # the noise multiplier the `no-noise` bug adds (the accountant counts the configured one)


# ----------------------------------------------------------------------------- the lower bound


def p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """An upper bound, under (epsilon, delta)-DP, on the probability of v or more correct guesses
    out of r, m canaries each included with probability 1/2.

    Corollary 5.4 (of Theorem 5.2) of Steinke, Nasr and Jagielski (arXiv:2305.08846v1; Appendix D's
    `p_value_DP_audit`): with f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],
    P[W >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[W' = v - i] for i = 1..v
    alpha = max(0.0, float(np.max(np.cumsum(below) / np.arange(1, v + 1))))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """The largest eps such that v or more correct guesses out of r (m canaries, each included with
    probability 1/2) would have probability < beta under (eps, delta)-DP; 0.0 when even eps = 0 is
    not rejected. The round is then not (eps', delta)-DP for any eps' below it, with confidence
    1 - beta. Appendix D's `get_eps_audit` (arXiv:2305.08846v1), its bisection replaced by Brent's
    method on the same p-value (`p_value`): both take the p-value to cross beta once as eps grows.
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")

    def excess(eps: float) -> float:
        return p_value(m, r, v, epsilon=eps, delta=delta) - beta

    if excess(0.0) >= 0:
        return 0.0
    high = 1.0
    while excess(high) < 0:  # p -> 1 as eps grows (r >= v), so this ends
        high *= 2
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-9))


# ----------------------------------------------------------------------------- the audited round


@dataclass(frozen=True)
class AuditResult:
    """One audit: its mode, the guesses (m canaries, r guesses, v correct), the epsilon the round's
    accountant reports and the lower bound the guesses prove (confidence 1 - beta)."""

    mode: str
    m: int
    r: int
    v: int
    epsilon: float  # accounted: Opacus's RDP accountant history of the round, at delta
    lower_bound: float
    beta: float
    delta: float
    noise_multiplier: float  # what the accountant counted
    steps: int
    sample_rate: float
    seconds: float

    @property
    def passed(self) -> bool:
        """The machinery passed: what the attack proves does not exceed what was accounted."""
        return self.lower_bound <= self.epsilon


class Canaries:
    """m gradient canaries: unit directions in parameter space (from the round's seed: the attacker
    knows them) and which are in (drawn from the OS's entropy: the attacker does not see it)."""

    def __init__(self, m: int, dim: int, settings: AuditSettings, dev: torch.device):
        directions = torch.randn(m, dim, generator=torch.Generator().manual_seed(settings.seed))
        self.directions = (directions / directions.norm(dim=1, keepdim=True)).to(dev)
        secret = torch.Generator().manual_seed(secret_seed())
        self.included = torch.rand(m, generator=secret) < 0.5
        self._sampling = secret  # each step's Poisson membership of the included canaries
        self.sample_rate, self.norm = settings.sample_rate, settings.max_grad_norm

    def step_gradient(self) -> torch.Tensor:
        """The sum of this step's canary gradients (each included one joins with the sample rate)."""
        joins = self.included & (torch.rand(len(self.included), generator=self._sampling) < self.sample_rate)
        return self.norm * (joins.to(self.directions) @ self.directions)


def _hook_noise(
    optimizer: DPOptimizer,
    params: list[nn.Parameter],
    *,
    canaries: Canaries | None = None,
    broken_noise: float | None = None,
    noise_log: list[torch.Tensor] | None = None,
) -> None:
    """Wrap `optimizer.add_noise` (Opacus 1.6: called in `pre_step` after the clipping, before
    `scale_grad` and the accountant's step hook): add the canaries' gradients to each parameter's
    clipped sum `summed_grad` first; add the noise of noise multiplier `broken_noise` instead of the
    optimizer's (the accountant, which reads the optimizer's, still counts the configured noise);
    append the noise added (flat, float64) to `noise_log`."""
    if [id(p) for p in optimizer.params] != [id(p) for p in params]:
        raise RuntimeError("the DP optimizer's parameters are not the model's, in the model's order")
    original = optimizer.add_noise

    def add_noise() -> None:
        if canaries is not None:
            extra = canaries.step_gradient()
            offset = 0
            for p in params:
                p.summed_grad.add_(extra[offset : offset + p.numel()].view_as(p.summed_grad))
                offset += p.numel()
        sums = [p.summed_grad.detach().clone() for p in params] if noise_log is not None else []
        configured = optimizer.noise_multiplier
        if broken_noise is not None:
            optimizer.noise_multiplier = broken_noise
        try:
            original()
        finally:
            optimizer.noise_multiplier = configured
        if noise_log is not None:
            noise_log.append(
                torch.cat([(p.grad - s).flatten().double() for p, s in zip(params, sums, strict=True)])
            )

    optimizer.add_noise = add_noise


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def _site(settings: AuditSettings, index: int) -> SiteConfig:
    """Synthetic site `index`: 0 is the audited hospital, 1 the coordinator's own data."""
    data = SiteDataConfig(
        format="synthetic",
        partition=SitePartition(index=index, num_sites=2, seed=settings.seed),
        synthetic=SyntheticConfig(train_per_site=settings.train_size, test_per_site=4),
    )
    return SiteConfig(site=f"audit-site-{index}", data=data)


def train_private_round(
    settings: AuditSettings,
    site: SiteConfig,
    randomness: RoundRandomness,
    noise_multiplier: float,
    **hook,
) -> tuple[torch.Tensor, list]:
    """One DP-SGD round of the site's machinery (plain SGD, lr 1) from the round's initial model:
    (the update w_final - w_initial, flat float64; the accountant's history). `hook`: what
    `_hook_noise` adds (canaries, a broken noise multiplier, a log of the noise)."""
    data = load_site_data(site)
    model = build_model(settings.model, seed=settings.seed).to(randomness.noise.device)
    model.train()
    before = _flat(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = make_private(
        model=model,
        optimizer=optimizer,
        # make_private replaces this loader by Poisson batches at the sample rate, drawn from it
        data_loader=train_loader(data.train_x, data.train_y, 1, randomness.sampling),
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        noise_generator=randomness.noise,
        poisson=PoissonPlan(settings.sample_rate, settings.expected_batch_size),
    )
    _hook_noise(dp.optimizer, list(model.parameters()), **hook)
    try:
        train_epochs(
            dp.model, dp.data_loader, dp.optimizer, criterion=dp.criterion, epochs=settings.epochs,
            generator=randomness.augment, private=True,
        )  # fmt: skip
    finally:
        model = dp.unwrap()
    if dp.steps != settings.steps:
        raise RuntimeError(f"the round took {dp.steps} steps, {settings.steps} were planned")
    return _flat(model) - before, dp.history()


def predicted_noise(settings: AuditSettings, noise_multiplier: float) -> torch.Tensor:
    """The attacker's replay of a seeded round on its own data (synthetic site 1), with the seed and
    round it sent: the sum over steps of the noise its replay drew, which is the site's if the
    noise is seeded from the round (flat, float64)."""
    log: list[torch.Tensor] = []
    randomness = RoundRandomness.repeatable(settings.seed, settings.training_round, device())
    train_private_round(settings, _site(settings, 1), randomness, noise_multiplier, noise_log=log)
    return torch.stack(log).sum(dim=0)


def best_guesses(
    scores: torch.Tensor, included: torch.Tensor, settings: AuditSettings
) -> tuple[int, int, float]:
    """(r, v, lower bound) of the best of the attacker's choices of k: "in" for the k highest
    scores, "out" for the k lowest, abstain on the rest; each bound at beta / (number of choices)."""
    order = torch.argsort(scores.cpu(), descending=True)
    m, beta = len(order), settings.beta / len(settings.guesses)
    best = (0, 0, -1.0)
    for fraction in settings.guesses:
        k = max(1, min(m // 2, int(fraction * m)))
        v = int(included[order[:k]].sum()) + int((~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, v, delta=settings.delta, beta=beta)
        if bound > best[2]:
            best = (2 * k, v, bound)
    return best


def audit_round(mode: str, settings: AuditSettings | None = None) -> AuditResult:
    """Audit one DP round of the site's machinery in `mode` (one of MODES); see the module's docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    settings = settings or AuditSettings()
    t0, dev = time.perf_counter(), device()
    noise = derive_noise_multiplier(
        target_epsilon=settings.epsilon,
        delta=settings.delta,
        sample_rate=settings.sample_rate,
        steps_total=settings.steps,
    )
    dim = sum(p.numel() for p in build_model(settings.model).parameters())
    canaries = Canaries(settings.canaries, dim, settings, dev)
    randomness = (
        RoundRandomness.repeatable(settings.seed, settings.training_round, dev)
        if mode == "seeded"
        else RoundRandomness.secret(dev)
    )
    update, history = train_private_round(
        settings, _site(settings, 0), randomness, noise, canaries=canaries,
        broken_noise=BROKEN_NOISE if mode == "no-noise" else None,
    )  # fmt: skip
    batch = settings.expected_batch_size
    # what the coordinator sees: update = -(sum over steps of clipped sums + canaries + noise) / batch
    seen = -batch * update
    if mode == "seeded":
        seen = seen - predicted_noise(settings, noise)
    scores = canaries.directions @ seen.float().to(dev) / settings.max_grad_norm
    r, v, bound = best_guesses(scores, canaries.included, settings)
    return AuditResult(
        mode=mode,
        m=settings.canaries,
        r=r,
        v=v,
        epsilon=rdp_epsilon(history, delta=settings.delta),
        lower_bound=bound,
        beta=settings.beta,
        delta=settings.delta,
        noise_multiplier=float(history[0][0]),
        steps=sum(steps for _, _, steps in history),
        sample_rate=settings.sample_rate,
        seconds=time.perf_counter() - t0,
    )
