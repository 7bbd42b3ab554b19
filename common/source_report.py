"""What a scan of a hospital's folder found (common.sources.scan_site): the usable samples with the
facts read from their files, the bad files and rows, and the notes; `to_site_data` turns a usable
report into the SiteData a site trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.labels import SPLITS
from common.sitedata import SiteData


@dataclass
class BadFile:
    """A file or label row left out (or, with on_bad_file: fail, refused), and why."""

    file: str  # relative to the image folder; a SOP Instance UID for a row that names only that
    problem: str  # short: truncated, not DICOM, no pixel data, unsupported compression, ...
    detail: str  # the full reason and what to do
    line: int | None = None  # the label sheet's line, when the problem comes from a row


@dataclass
class Sample:
    """One usable image: its row in the label sheet and the facts read from its file."""

    file: str  # relative to the image folder
    patient_id: str  # from the label sheet
    label: str
    label_index: int
    split: str  # train | val | test
    line: int
    modality: str = ""
    orig_size: tuple[int, ...] = ()  # rows, cols as stored
    spacing: tuple[float, ...] = ()  # row, col spacing in mm; () when unknown
    n_frames: int = 1
    colour_file: bool = False  # the file holds colour (kept with data.colour rgb, else read as grey)
    sop_instance_uid: str = ""
    file_patient_id: str = ""  # Patient ID inside the DICOM file ("" for other formats)
    sha1: str = ""
    acquisition: dict = field(default_factory=dict)  # the file's acquisition metadata (DICOM)

    def acquisition_facts(self) -> dict:
        """What drift monitoring compares of this image's acquisition: the file's metadata, its
        modality and its row pixel spacing (when known)."""
        facts = {**self.acquisition, "modality": self.modality} if self.modality else dict(self.acquisition)
        if self.spacing:
            facts["pixel_spacing"] = float(self.spacing[-2] if len(self.spacing) >= 2 else self.spacing[0])
        return facts


@dataclass
class SourceReport:
    """Everything `scan_site` found; `usable` says whether the site can train on it."""

    site: str
    format: str
    root: Path
    labels: Path
    classes: list[str]
    on_bad_file: str
    colour: str = "grey"  # the site config's data.colour
    samples: list[Sample] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)  # segmentation sheets: each sample's label map
    images: torch.Tensor | None = None  # N x C x H x W float32, in the order of `samples`
    bad: list[BadFile] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)  # files in the folder that no row names
    split_conflicts: dict[str, list[str]] = field(default_factory=dict)  # patient -> splits
    fatal: list[str] = field(default_factory=list)  # why the data cannot be used, whatever the policy
    notes: list[str] = field(default_factory=list)
    decoded: int = 0  # images read from their files in this scan
    from_cache: int = 0  # images served by the cache
    seconds: float = 0.0

    @property
    def usable(self) -> bool:
        return not self.fatal and not (self.on_bad_file == "fail" and self.bad)

    def reasons(self) -> list[str]:
        """Why the data is not usable (empty when it is)."""
        out = list(self.fatal)
        if self.on_bad_file == "fail" and self.bad:
            out.append(
                f"{len(self.bad)} bad file(s) or row(s) and 'data.on_bad_file' is 'fail' "
                f"(first: {describe(self.bad[0])}); fix or remove them, or set on_bad_file: skip"
            )
        return out

    def count(self, split: str, label_index: int | None = None) -> int:
        return sum(1 for s in self.samples if s.split == split and label_index in (None, s.label_index))

    def patients(self, split: str | None = None) -> set[str]:
        return {s.patient_id for s in self.samples if split is None or s.split == split}

    def summary(self) -> str:
        counts = ", ".join(f"{s} {self.count(s)}" for s in SPLITS)
        state = "usable" if self.usable else "NOT usable: " + "; ".join(self.reasons())
        return (
            f"site '{self.site}': {len(self.samples)} images ({counts}) of {len(self.patients())} "
            f"patients, {len(self.bad)} bad file(s) or row(s), {len(self.unlabelled)} unlabelled "
            f"file(s); {state}"
        )

    def to_site_data(self) -> SiteData:
        assert self.images is not None and self.usable, "to_site_data needs a usable report"
        x, y, patients, acquisition = {}, {}, {}, {}
        for split in SPLITS:
            idx = [i for i, s in enumerate(self.samples) if s.split == split]
            x[split] = self.images[idx].contiguous()
            if self.masks:  # segmentation: the label maps
                size = tuple(self.images.shape[2:])
                y[split] = (
                    torch.stack([self.masks[i] for i in idx])
                    if idx
                    else torch.zeros((0, *size), dtype=torch.int64)
                )
            else:
                y[split] = torch.tensor([self.samples[i].label_index for i in idx], dtype=torch.int64)
            patients[split] = [self.samples[i].patient_id for i in idx]
            acquisition[split] = [self.samples[i].acquisition_facts() for i in idx]
        notes = list(self.notes)
        in_colour = sum(s.colour_file for s in self.samples)
        if in_colour and self.colour == "grey":
            notes.append(
                f"{in_colour} colour file(s) read as grey (data.colour: grey); to keep their colour set "
                "data.colour: rgb and data.preprocess.channels: 3"
            )
        if self.bad:
            notes.append(
                f"skipped {len(self.bad)} bad file(s) or row(s) (on_bad_file: skip): "
                + ", ".join(f"{b.file} ({b.problem})" for b in self.bad)
            )
        has_val = len(y["val"]) > 0
        return SiteData(
            site=self.site,
            train_x=x["train"],
            train_y=y["train"],
            test_x=x["test"],
            test_y=y["test"],
            val_x=x["val"] if has_val else None,
            val_y=y["val"] if has_val else None,
            classes=list(self.classes),
            notes=notes,
            train_patients=patients["train"],
            test_patients=patients["test"],
            val_patients=patients["val"] if has_val else None,
            acquisition=acquisition,
        )


def describe(bad: BadFile) -> str:
    """A bad file or row as the log and the report name it."""
    where = f" (labels line {bad.line})" if bad.line else ""
    return f"{bad.file}{where}: {bad.problem}"
