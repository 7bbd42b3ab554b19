"""Wrap a site's model, optimizer, data loader and loss for one round of DP-SGD with Opacus.

`make_private` returns the same four objects, made private, plus the round's own RDP accountant;
train with them as usual (same loop for every grad_sample_mode):

    dp = make_private(model=model, optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
                      noise_multiplier=1.1, max_grad_norm=1.0, noise_generator=randomness.noise)
    for x, y in dp.data_loader:
        dp.optimizer.zero_grad()
        dp.criterion(dp.model(x), y).backward()   # ghost clipping: two backward passes inside
        dp.optimizer.step()                       # clips, adds noise, counts the step
    accountant.record_round(round=r, delta=policy.delta, **dp.spending())   # client.ledger

Each call makes a fresh PrivacyEngine, so `dp.accountant` holds only this round's steps; the site's
cumulative epsilon lives in the ledger (`client.ledger`), not here. Every optimizer step counts,
including steps on an empty Poisson batch: do not skip those in the training loop (skipping one
would reveal that the batch was empty and leave the step uncounted).

Randomness is a parameter: the noise comes from `noise_generator` and Poisson batch membership from
the data loader's own generator (client.randomness makes both from the OS's entropy), never from
torch's global generator.
"""

from __future__ import annotations

import ctypes
import functools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

import client.grad_sample  # registers the faster Conv2d / Conv3d per-sample gradients
from common.privacy import HistoryItem, PrivacyConfigError, PrivacyRequest
from common.schema import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES
from common.weight_standardization import WS_CONVS

# Opacus's per-sample hooks sit on every layer, the first one too, whose input (the images) needs no
# gradient: torch then warns once per backward pass. Expected, and harmless: silence it.
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with respect to module outputs",
)
# Opacus warns that its own secure RNG (torchcsprng) is off; fedward gives it generators seeded from
# the OS's entropy instead (client.randomness), so the warning does not apply.
warnings.filterwarnings("ignore", message="Secure RNG turned off")


@dataclass(frozen=True)
class PoissonPlan:
    """Poisson sampling fixed in advance: each sample joins each batch with `sample_rate`, and the
    clipped, noised gradient sum is divided by `expected_batch_size`."""

    sample_rate: float
    expected_batch_size: float


@dataclass
class PrivateTraining:
    """The objects to train one DP round with, and what that round has spent so far."""

    model: torch.nn.Module  # Opacus GradSampleModule wrapping the site's model
    optimizer: DPOptimizer  # clips per-sample gradients, adds noise, steps the accountant
    data_loader: (
        DataLoader  # Poisson-sampled (from the given loader's generator) unless poisson_sampling=False
    )
    criterion: Callable[..., Any]  # ghost: Opacus's DPLossFastGradientClipping; else unchanged
    accountant: RDPAccountant  # this round's steps only
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # 1 / batches per epoch: what the accountant counts each step with
    grad_sample_mode: str
    # hooks mode: conv and GroupNorm layers whose forward skips the (unused) batch weight gradient
    detached: list[torch.nn.Module] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Optimizer steps taken (and counted by the accountant) since `make_private`."""
        return sum(steps for _, _, steps in self.accountant.history)

    def history(self) -> list[HistoryItem]:
        """This round's accountant history, [(noise_multiplier, sample_rate, steps), ...]."""
        return [(float(nm), float(q), int(s)) for nm, q, s in self.accountant.history]

    def unwrap(self) -> torch.nn.Module:
        """Remove Opacus's hooks and return the site's own model (its weights, its state_dict keys).

        Call once the round's training is done, before sending the weights or wrapping it again.
        """
        self.keep_batch_weight_grads()
        return self.model.to_standard_module()

    def keep_batch_weight_grads(self) -> None:
        """Give the conv and GroupNorm layers back their own forward (see `_skip_batch_weight_grads`)."""
        for layer in self.detached:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop(client.grad_sample.KEPT_STATS, None)
        self.detached = []

    def spending(self) -> dict[str, float | int]:
        """This round as ledger fields: steps, sample_rate, noise_multiplier, max_grad_norm.

        Raises:
            RuntimeError: no step was taken, or the round mixed sample rates or noise levels
                (e.g. gradient accumulation), which one ledger line cannot hold.
        """
        groups = {(nm, q) for nm, q, _ in self.history()}
        if len(groups) != 1:
            raise RuntimeError(
                f"cannot record this round as one ledger entry: its accountant history is "
                f"{self.accountant.history}; expected one (noise, sample rate) group, >= 1 step"
            )
        ((noise_multiplier, sample_rate),) = groups
        return {
            "steps": self.steps,
            "sample_rate": sample_rate,
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": float(self.max_grad_norm),
        }


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc's allocator to keep freed memory for reuse, once per process.

    A DP step allocates per-sample gradients of tens of MB and frees them again; glibc returns blocks
    that large to the system (mmap / trim), so the next step page-faults all of it in afresh, which cost
    `cnn28` a third of its DP step (bench/bench_dp_overhead.py). Kept memory is bounded by the largest
    step's. Elsewhere than glibc nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's largest: blocks up to 32 MB from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 * 2**30)  # and freed heap memory kept, up to 1 GB


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def make_private(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    criterion: Callable[..., Any],
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator,
    poisson_sampling: bool = True,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    poisson: PoissonPlan | None = None,
) -> PrivateTraining:
    """Make `model`, `optimizer`, `data_loader` and `criterion` private for one round.

    `optimizer` holds exactly `model`'s parameters; `model` is Opacus-compatible (common.opacus_compat).
    Noise comes from `noise_generator` (on the model's device), Poisson batches from `data_loader.generator`;
    poisson_sampling=False makes epsilon an approximation (sites refuse it). `poisson` fixes the sample
    rate and the divisor of the gradient sum instead of the data set's exact size (never released).

    Raises:
        PrivacyConfigError: a setting is out of range, or ghost clipping without a mean loss.
        opacus.validators.errors.UnsupportedModuleError: the model has layers Opacus cannot train.
    """
    _check_settings(grad_sample_mode, noise_multiplier, max_grad_norm, criterion, poisson_sampling)
    keep_freed_memory()
    if poisson is not None:  # our own Poisson loader at the planned rate; Opacus keeps it as it is
        data_loader, poisson_sampling = _poisson_loader(data_loader, poisson), False
    engine = PrivacyEngine(accountant="rdp")  # a fresh accountant: this round's steps only
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator,
        loss_reduction="sum" if grad_sample_mode == "hooks" else "mean",  # hooks: _hooks_mode_savings
    )
    detached = _hooks_mode_savings(model, *private[:2]) if grad_sample_mode == "hooks" else []
    dp_model, dp_optimizer, dp_criterion, dp_loader = (  # ghost: Opacus's criterion; else ours unchanged
        private if len(private) == 4 else (*private[:2], criterion, private[2])
    )
    if poisson is not None:
        dp_model.forbid_grad_accumulation()  # as Opacus does for its own Poisson loader
        dp_optimizer.expected_batch_size = poisson.expected_batch_size
    return PrivateTraining(
        model=dp_model,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        criterion=dp_criterion,
        accountant=engine.accountant,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=1.0 / len(dp_loader),  # as PrivacyEngine.make_private computes it
        grad_sample_mode=grad_sample_mode,
        detached=detached,
    )


def _hooks_mode_savings(model: torch.nn.Module, dp_model, dp_optimizer: DPOptimizer) -> list[torch.nn.Module]:
    """`hooks` mode's savings: conv and GroupNorm layers skip the batch weight gradient nothing uses
    (`_skip_batch_weight_grads`, returned; GroupNorm layers also keep their forward statistics for
    their per-sample gradients, client.grad_sample), and the output gradient is multiplied by the batch size
    once, at the model's output, instead of at every layer (client.grad_sample.scale_once_at_output):
    Opacus hooks the layers as for a summed loss (make_private asks for "sum"), and the optimizer still
    divides the clipped, noised sum by the expected batch size, as for the mean loss it is."""
    detached = _skip_batch_weight_grads(model)
    client.grad_sample.scale_once_at_output(dp_model)
    dp_optimizer.loss_reduction = "mean"
    return detached


def _poisson_loader(data_loader: DataLoader, poisson: PoissonPlan) -> DPDataLoader:
    batches = round(1.0 / poisson.sample_rate) if poisson.sample_rate > 0 else 0
    if batches < 1 or abs(batches * poisson.sample_rate - 1.0) > 1e-9:
        # an epoch of 1 / q steps is whole only for q = 1 / k; any other rate would be taken at one
        # rate and counted at another
        raise PrivacyConfigError(
            f"the sample rate must be 1 / a whole number of batches, got {poisson.sample_rate}"
        )
    loader = DPDataLoader(
        data_loader.dataset,
        sample_rate=poisson.sample_rate,
        generator=data_loader.generator,
        collate_fn=data_loader.collate_fn,  # e.g. client.patients' batches of whole patients
    )
    # the steps of an epoch are the planned ones, 1 / sample rate (the guard plans 1 / batches): Opacus
    # takes int(1 / q), one fewer where 1 / q falls just below the whole number (int(1 / (1 / 93)) is
    # 92), and its accountant then counts 1 / 92, not the rate the site's budget check planned for
    loader.batch_sampler.steps = batches
    return loader


def _check_settings(
    grad_sample_mode: str, noise_multiplier: float, max_grad_norm: float, criterion, poisson_sampling: bool
) -> None:
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise PrivacyConfigError(
            f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}"
        )
    if not noise_multiplier > 0:
        raise PrivacyConfigError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise PrivacyConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if grad_sample_mode == "ghost" and not isinstance(criterion, torch.nn.CrossEntropyLoss):
        # Opacus's ghost clipping sets the loss's `reduction` to 'none' and weighs each sample's loss by
        # that sample's clip factor: a loss that ignores `reduction` (a Dice loss averaged over the
        # batch) would have every sample scaled by the batch's mean factor, not clipped one by one.
        # Cross-entropy (and client.train's class-balanced one) returns one loss per sample.
        raise PrivacyConfigError(
            f"ghost clipping needs a cross-entropy loss that returns one loss per sample, got "
            f"{type(criterion).__name__}; use grad_sample_mode='hooks'"
        )
    if grad_sample_mode == "ghost" and criterion.reduction != "mean":
        raise PrivacyConfigError(
            f"ghost clipping needs a loss with reduction='mean', got {criterion.reduction!r}; "
            "pass e.g. nn.CrossEntropyLoss() or use grad_sample_mode='hooks'"
        )
    if not poisson_sampling:
        warnings.warn(
            "poisson_sampling=False: batches are not Poisson-sampled, so the RDP epsilon recorded "
            "for this round is an approximation, not a guarantee.",
            stacklevel=3,
        )


def _conv_forward_without_weight_grad(
    self: torch.nn.Conv2d | torch.nn.Conv3d, x: torch.Tensor
) -> torch.Tensor:
    # the first layer (its input needs no gradient): without the weights in the graph its output would
    # need no gradient either, and Opacus's backward hook would never fire
    weight = self.effective_weight() if isinstance(self, WS_CONVS) else self.weight
    if not x.requires_grad:
        return self._conv_forward(x, weight, self.bias)
    bias = None if self.bias is None else self.bias.detach()
    return self._conv_forward(x, weight.detach(), bias)


def _skip_batch_weight_grads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """In `hooks` mode DP-SGD never uses the batch gradient autograd computes for a weight: Opacus's
    hooks compute per-sample gradients from the layer's input and output gradient, and the DP
    optimizer replaces `.grad` with the clipped, noised sum of those. For Conv2d and Conv3d layers that batch
    weight gradient is a large share of the backward pass, so their forward uses detached weights
    (the input gradient still flows); GroupNorm layers likewise, through a forward that also keeps
    the statistics their per-sample gradients need (client.grad_sample). Not for ghost clipping,
    whose second backward pass needs them. `PrivateTraining.unwrap` restores the layers' own forward."""
    forwards = {
        conv: _conv_forward_without_weight_grad for conv in (torch.nn.Conv2d, torch.nn.Conv3d, *WS_CONVS)
    }
    forwards[torch.nn.GroupNorm] = client.grad_sample.group_norm_forward_keeping_stats
    layers = [m for m in model.modules() if type(m) in forwards and "forward" not in m.__dict__]
    for layer in layers:
        layer.forward = types.MethodType(forwards[type(layer)], layer)
    return layers


def make_private_for(
    request: PrivacyRequest,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    criterion: Callable[..., Any],
    noise_generator: torch.Generator,
    poisson: PoissonPlan | None = None,
) -> PrivateTraining:
    """`make_private` with the settings of a `PrivacyRequest` (model put in training mode)."""
    model.train()  # Opacus wraps a model in training mode
    return make_private(
        model=model,
        optimizer=optimizer,
        data_loader=data_loader,
        criterion=criterion,
        noise_multiplier=request.noise_multiplier,
        max_grad_norm=request.max_grad_norm,
        noise_generator=noise_generator,
        poisson_sampling=request.poisson_sampling,
        grad_sample_mode=request.grad_sample_mode,
        poisson=poisson,
    )
