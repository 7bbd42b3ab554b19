"""Patient-level DP-SGD: the unit of privacy is a patient, however many images the patient has.

Image-level DP-SGD protects one image; a patient with three images is then protected far less than
the epsilon says. With patient ids (a hospital's label sheet has them), a site trains instead on
patients: each step draws patients by Poisson sampling (client.train's loader of a `PatientDataset`,
made Poisson by client.dp; `patient_loader` is the same on its own), every image of a drawn patient is
in the batch (at most the site's `limits.max_images_per_patient`, drawn afresh each step), and the
per-image gradients that Opacus computes are summed per patient (`sum_per_patient`, just before the
optimizer clips) so that one gradient per patient is clipped to the clip norm and the noise is added
to the sum of those. A large batch of patients is computed in physical batches of whole patients
(client.train.physical_batches). The accountant counts patient-level steps, and the site's released
count is its number of patients.

    loader = patient_loader(x, y, groups, sample_rate=q, generator=g)   # batches: x, y, owner
    ...backward... ; sum_per_patient(dp.model, owner) ; dp.optimizer.step()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:  # Opacus (about a second to import): loaded where patients are sampled
    from opacus.data_loader import DPDataLoader


def patient_groups(patients: Sequence[str]) -> list[list[int]]:
    """The indices of each patient's images, patients in the order they first appear."""
    groups: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(patient, []).append(i)
    return list(groups.values())


class PatientDataset(Dataset):
    """One item per patient: the patient's images and labels; with `max_images`, at most that many of
    them, drawn afresh from `generator` each time the patient is drawn (the site's
    `limits.max_images_per_patient`, which bounds a step's memory whatever the data; the sum of a
    patient's images' gradients is clipped all the same, so the guarantee does not depend on it)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        groups: list[list[int]],
        *,
        max_images: int = 0,
        generator: torch.Generator | None = None,
    ):
        if max_images and generator is None:
            raise ValueError("drawing a patient's images needs the round's generator")
        self.x, self.y, self.groups = x, y, groups
        self.max_images, self.generator = max_images, generator

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.groups[i]
        if self.max_images and len(idx) > self.max_images:
            drawn = torch.randperm(len(idx), generator=self.generator)[: self.max_images]
            idx = [idx[j] for j in sorted(drawn.tolist())]
        return self.x[idx], self.y[idx]


def collate_patients(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """A batch of patients as (images, labels, owner): owner[j] is the batch position of image j's patient."""
    xs, ys = zip(*items, strict=True)
    owner = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(y) for y in ys]))
    return torch.cat(xs), torch.cat(ys), owner


def unpack_batch(batch, patients: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels, owner) of a loader's batch (`patients`: of a PatientDataset); owner is None
    for image-level batches.

    Opacus's Poisson loader gives an empty batch as zeros shaped like one dataset item with a batch
    dimension of 0: for patients that is (0, images of a patient, ...) with labels (0, images, ...)
    and no owner; it is turned here into an empty patient-level batch of images. (Told, not guessed
    from the labels' shape: a segmentation site's image-level labels have as many dimensions.)"""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    x, y = batch
    if patients:  # an empty batch of patients
        return x.flatten(0, 1), y.flatten(0, 1), torch.zeros(0, dtype=torch.long)
    return x, y, None


def patient_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: list[list[int]],
    *,
    sample_rate: float,
    generator: torch.Generator,
) -> DPDataLoader:
    """Poisson sampling of patients: each patient joins each batch with `sample_rate`."""
    from opacus.data_loader import DPDataLoader

    return DPDataLoader(
        PatientDataset(x, y, groups),
        sample_rate=sample_rate,
        collate_fn=collate_patients,
        generator=generator,
    )


def sum_per_patient(model: torch.nn.Module, owner: torch.Tensor) -> None:
    """Replace every parameter's per-image gradients (Opacus's `grad_sample`, images x shape) by their
    sums per patient (patients x shape), so the optimizer clips one gradient per patient. Fails closed:
    a trainable parameter without per-image gradients (ghost clipping keeps none) raises, since the
    optimizer would then clip each image alone and a patient could contribute many clipped gradients."""
    n = int(owner.max()) + 1 if len(owner) else 0
    for p in model.parameters():
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            if p.requires_grad:
                raise RuntimeError("patient-level DP-SGD needs each image's gradient (hooks mode, not ghost)")
            continue
        per_patient = torch.zeros((n, *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
        p.grad_sample = per_patient.index_add_(0, owner.to(sample.device), sample)
