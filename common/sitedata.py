"""A site's data as the training code sees it, and the error for data a site cannot use.

Images are float32 tensors N x C x H x W; labels are int64. Every loader (common.data) returns a
`SiteData`, or raises `SiteDataError` naming the site, the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SiteDataError(ValueError):
    """A site's data cannot be used: the message names the site, the file and what to do."""


@dataclass
class SiteData:
    site: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    # the patient of each training, test and validation image, where the data has patient ids (a label sheet)
    train_patients: list[str] | None = None
    test_patients: list[str] | None = None
    val_patients: list[str] | None = None
    # per split ("train", "val", "test"), each image's acquisition facts (manufacturer, model, kvp,
    # photometric, date, modality, pixel_spacing: what its file says); None for arrays (synthetic, MedMNIST)
    acquisition: dict[str, list[dict]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task(self) -> str:
        """segmentation when the labels are masks (N x H x W label maps), else classification."""
        return "segmentation" if self.train_y.ndim > 1 else "classification"

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


def site_data_from_arrays(site: str, splits: dict, classes: list[str]) -> SiteData:
    """SiteData from {split: (N x H x W or N x C x H x W float32 images, N int64 labels)}: grey
    images get their channel axis; `val` is optional."""

    def t(x) -> torch.Tensor:
        x = torch.from_numpy(x.copy() if not x.flags.c_contiguous else x)
        return x.unsqueeze(1) if x.ndim == 3 else x

    val = splits.get("val")
    return SiteData(
        site=site,
        train_x=t(splits["train"][0]),
        train_y=torch.from_numpy(splits["train"][1]),
        test_x=t(splits["test"][0]),
        test_y=torch.from_numpy(splits["test"][1]),
        val_x=t(val[0]) if val else None,
        val_y=torch.from_numpy(val[1]) if val else None,
        classes=classes,
    )
