"""The one training recipe: a round of local training, with or without DP-SGD, and prediction.

`train_round(model, x, y, plan)` is what every model in fedward is trained with: the ClientApp's rounds
(client.site), a study's local-only and centralized references (server.study) and the benchmarks. It
builds the round's loader, optimizer and loss from the `RoundPlan` (common.round), wraps them with
Opacus when given a `PrivacyRequest`, trains `plan.local_epochs` epochs and hands back the site's own
model. Plain PyTorch, no Flower, testable on its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.patients import PatientDataset, collate_patients, sum_per_patient, unpack_batch
from client.randomness import RoundRandomness
from client.scaffold_correction import correct_after_each_step
from common.privacy import PrivacyRequest
from common.round import RoundPlan
from common.transforms import BatchAugment, acquisition_transforms

if TYPE_CHECKING:  # client.dp loads Opacus (about a second): imported where a round is private
    from client.dp import PoissonPlan, PrivateTraining

DEVICE_ENV = "FEDWARD_DEVICE"  # e.g. "cpu" to keep a site with a GPU on its CPU


def device() -> torch.device:
    """The site's accelerator when it has one, else the CPU; FEDWARD_DEVICE chooses explicitly."""
    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        return torch.device(chosen)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    seconds: float


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batch augmentation: random horizontal flips and shifts of up to 2 pixels."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def augment_with_masks(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation's augmentation: each image flipped along each spatial axis at random (half the
    time each), its mask flipped with it, so the two stay aligned."""
    for axis in range(-1, -(y.dim() - 1) - 1, -1):  # the mask's spatial axes, last first
        flip = (torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5).to(x.device)
        shape_x = (-1,) + (1,) * (x.dim() - 1)
        shape_y = (-1,) + (1,) * (y.dim() - 1)
        x = torch.where(flip.view(shape_x), x.flip(axis), x)
        y = torch.where(flip.view(shape_y), y.flip(axis), y)
    return x, y


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=lr)


class BalancedCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy with each sample's loss weighted by a fixed weight of its class, averaged over
    the batch (not over the weights, unlike `CrossEntropyLoss(weight=...)`), so that one sample's
    loss never depends on the rest of the batch. Honours `reduction` as Opacus sets it."""

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        self.register_buffer("class_weights", class_weights.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(logits, target, reduction="none") * self.class_weights[target]
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


class SegmentationLoss(nn.Module):
    """Dice plus cross-entropy (MONAI's DiceCELoss, softmax over the classes) of logits N x K x H x W
    against label maps N x H x W, averaged over the batch (so each image's loss is its own, as
    DP-SGD's per-sample clipping needs); an empty batch (Poisson sampling) gives a zero loss."""

    def __init__(self):
        super().__init__()
        from monai.losses import DiceCELoss

        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[0] == 0:
            return logits.sum() * 0.0
        return self.dice_ce(logits, target[:, None].long())


def make_criterion(
    train_y: torch.Tensor, num_classes: int, balanced: bool, task: str = "classification"
) -> nn.Module:
    """The training loss: plain cross-entropy, or class-balanced (weights n / (classes x n_class),
    counted on these training labels; a class absent here gets weight 0); for segmentation Dice plus
    cross-entropy."""
    if task == "segmentation":
        return SegmentationLoss()
    if not balanced:
        return nn.CrossEntropyLoss()
    counts = torch.bincount(train_y.long().flatten(), minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (int((counts > 0).sum()) * counts.clamp(min=1)), 0.0)
    return BalancedCrossEntropy(weights)


def expand_views(
    xb: torch.Tensor, yb: torch.Tensor, views: int, gen: torch.Generator, *, batch_augment, masks: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`views` augmentations of each image, image by image (image i's views at i*views ... i*views+views-1)."""
    xs, ys = [], []
    for _ in range(views):
        if masks:
            x, y = augment_with_masks(xb, yb, gen)
        else:
            x, y = (batch_augment(xb, gen) if batch_augment is not None else augment(xb, gen)), yb
        xs.append(x)
        ys.append(y)
    return torch.stack(xs, 1).flatten(0, 1), torch.stack(ys, 1).flatten(0, 1)


def augmented(xb, yb, gen: torch.Generator, *, views: int, batch_augment, masks: bool):
    """A batch as training sees it: its views (views > 1), image and mask flipped together (masks),
    the batch augmentation, or as it is."""
    if views > 1:
        return expand_views(xb, yb, views, gen, batch_augment=batch_augment, masks=masks)
    if masks:
        return augment_with_masks(xb, yb, gen)
    return (batch_augment(xb, gen) if batch_augment is not None else xb), yb


def physical_batches(loader: DataLoader, optimizer, size: int) -> DataLoader:
    """A private round's logical (Poisson) batches cut into physical ones of at most `size` items
    (images; with patient-level DP whole patients) by Opacus's BatchMemoryManager loader: the optimizer
    clips each (per patient after client.patients.sum_per_patient, a patient never being cut), and
    steps and adds noise once per logical batch, so a large logical batch fits in memory. `size` 0:
    the loader as it is."""
    if size <= 0:
        return loader
    from opacus.utils.batch_memory_manager import wrap_data_loader

    return wrap_data_loader(data_loader=loader, max_batch_size=size, optimizer=optimizer)


def with_acquisition(first: Callable | None) -> Callable:
    """`first` (a batch augmentation, or None), then each image re-rendered as another scanner might
    (common.transforms.acquisition_transforms), both driven by the round's generator."""
    rerender = BatchAugment(acquisition_transforms())

    def both(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return rerender(first(xb, gen) if first is not None else xb, gen)

    return both


def average_views(model: nn.Module, views: int) -> None:
    """Each image's per-sample gradient: the mean of its views' (Opacus's `grad_sample`, in place).
    Fails closed: a trainable parameter without per-sample gradients of whole images' views (ghost
    clipping, say) raises, since clipping each view alone would multiply what one image contributes."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        grad_sample = getattr(p, "grad_sample", None)
        if not isinstance(grad_sample, torch.Tensor) or grad_sample.shape[0] % views:
            raise RuntimeError(
                "augmentation multiplicity needs each view's per-sample gradient (not ghost clipping)"
            )
        p.grad_sample = grad_sample.view(-1, views, *grad_sample.shape[1:]).mean(1)


def train_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled batches drawn with `generator` (with DP, Opacus draws its Poisson batches from it too)."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    criterion: nn.Module | None = None,
    proximal_mu: float = 0.0,
    use_augment: bool = False,
    augment_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    private: bool = False,
    mask_augment: bool = False,
    views: int = 1,
) -> TrainResult:
    """Run `epochs` local epochs; with proximal_mu > 0 add FedProx's (mu/2)||w - w_global||^2.

    With `private=True` the model, optimizer, loader and criterion are Opacus's (client.dp): every
    batch is stepped, an empty Poisson batch included, since each step is counted as spent.
    `augment_fn` (the site's own augmentation, common.transforms) wins over `use_augment` (the
    study's simple flips and shifts); with `mask_augment` (segmentation, `train.augment`) image and
    mask are flipped together instead (augment_with_masks). `generator` drives the augmentation
    (default: seeded with 0). `views` > 1 is augmentation multiplicity (De et al., 2022): each image is
    augmented `views` times and, with privacy, its views' per-sample gradients are averaged before
    clipping (average_views), so every image still gives one clipped contribution.
    """
    batch_augment = augment_fn or (augment if use_augment else None)
    dev = next(model.parameters()).device
    criterion = criterion or nn.CrossEntropyLoss()
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    model.train()
    of_patients = isinstance(loader.dataset, PatientDataset)
    t0, total, n, steps = time.perf_counter(), 0.0, 0, 0
    for _ in range(epochs):
        for batch in loader:
            xb, yb, owner = unpack_batch(batch, of_patients)  # owner: patient-level batches
            if len(yb) == 0 and not private:
                continue
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            xb, yb = augmented(xb, yb, gen, views=views, batch_augment=batch_augment, masks=mask_augment)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            if global_params is not None:
                prox = sum(
                    (p - g).pow(2).sum() for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            if private and views > 1 and len(yb):  # one gradient per image: the mean of its views'
                average_views(model, views)
            if owner is not None:  # one gradient per patient: the sum of its images' (client.patients)
                sum_per_patient(model, owner)
            optimizer.step()
            total += float(loss.detach()) * len(yb)
            n += len(yb)
            steps += 1
    return TrainResult(loss=total / max(n, 1), num_examples=n, steps=steps, seconds=time.perf_counter() - t0)


@dataclass
class RoundResult:
    model: nn.Module  # the site's own model (Opacus's wrapper removed), holding the trained weights
    loss: float  # mean training loss over the round's batches
    num_examples: int
    steps: int
    seconds: float


@dataclass
class DPSettings:
    """How a round is made private: the request it trains under, Poisson sampling fixed in advance
    (client.dp.PoissonPlan; None: Opacus derives it from the data set), and a callback that counts
    the spending once training stops (called whenever a step was taken, even if training broke off)."""

    request: PrivacyRequest
    poisson: PoissonPlan | None = None
    on_steps: Callable[[PrivateTraining], None] | None = None
    patients: list[list[int]] | None = None  # patient-level DP: each patient's images (client.patients)
    images_per_patient: int = 0  # patient-level: at most this many of a patient's images a step (0: all)
    patients_per_step: int = 0  # patient-level: physical batches of at most this many patients (0: uncut)


def _round_loader(
    x: torch.Tensor, y: torch.Tensor, plan: RoundPlan, randomness: RoundRandomness, dp: DPSettings | None
) -> DataLoader:
    """The round's batches of images, or with patient-level DP of patients (make_private_for then
    turns it into Poisson sampling at dp.poisson's rate)."""
    if dp is None or dp.patients is None:
        return train_loader(x, y, plan.batch_size, randomness.sampling)
    dataset = PatientDataset(
        x, y, dp.patients, max_images=dp.images_per_patient, generator=randomness.sampling
    )
    return DataLoader(dataset, batch_size=1, collate_fn=collate_patients, generator=randomness.sampling)


def train_round(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: RoundPlan,
    *,
    augment_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    randomness: RoundRandomness | None = None,
    dp: DPSettings | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> RoundResult:
    """One round of local training of `model` on (x, y) as `plan` says.

    A fresh optimizer at the round's learning rate, the plan's loss (class-balanced from these labels
    when asked), FedProx's term when `plan.proximal_mu` > 0, `augment_fn` (a site's own augmentation)
    or the plan's flips and shifts, `plan.augment_views` views; with `dp`, DP-SGD (client.dp).
    `randomness`: the round's generators (a private round's are secret, client.guard; a plain round's
    default to the plan's seed and round). `correction`: SCAFFOLD's drift correction, applied after
    every step (client.scaffold_correction; with DP-SGD after the noise)."""
    if randomness is None:
        if dp is not None:
            raise ValueError("a private round needs its RoundRandomness (client.randomness), not a default")
        randomness = RoundRandomness.repeatable(plan.seed, plan.round)
    loader = _round_loader(x, y, plan, randomness, dp)
    optimizer = make_optimizer(model, plan.optimizer, plan.lr)
    if correction is not None:  # on the plain optimizer: Opacus's steps it after clipping and noise
        correct_after_each_step(optimizer, model, correction)
    criterion = make_criterion(y, plan.num_classes, plan.class_balance, plan.task).to(
        next(model.parameters()).device
    )
    segmenting = plan.task == "segmentation"  # flips of image and mask together, never image-only ones
    if plan.acquisition_augment and not segmenting:
        augment_fn = with_acquisition(augment_fn or (augment if plan.augment else None))
    private, trainee = None, model
    if dp is not None:
        from client.dp import make_private_for

        private = make_private_for(dp.request, model=model, optimizer=optimizer, data_loader=loader,
                                   criterion=criterion, noise_generator=randomness.noise, poisson=dp.poisson)  # fmt: skip
        trainee, optimizer, criterion = private.model, private.optimizer, private.criterion
        physical = plan.max_physical_batch if dp.patients is None else dp.patients_per_step
        loader = physical_batches(private.data_loader, optimizer, physical)
    try:
        result = train_epochs(
            trainee, loader, optimizer, criterion=criterion, epochs=plan.local_epochs, proximal_mu=plan.proximal_mu,
            use_augment=plan.augment and not segmenting, augment_fn=None if segmenting else augment_fn,
            generator=randomness.augment, private=dp is not None, mask_augment=segmenting and plan.augment,
            views=plan.augment_views,
        )  # fmt: skip
    finally:
        if private is not None:
            if private.steps and dp.on_steps is not None:
                dp.on_steps(private)
            model = private.unwrap()
    return RoundResult(model, result.loss, result.num_examples, result.steps, result.seconds)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Class probabilities, N x C (segmentation: N x C x H x W per pixel), as float64 numpy."""
    dev = next(model.parameters()).device
    model.eval()
    out = [
        torch.softmax(model(x[i : i + batch_size].to(dev)), dim=1).double().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 2))
