"""MONAI dictionary transforms built from a site config: reading, preprocessing, augmentation.

Samples are dictionaries: `image` (a file path before reading, then a 1 x H x W or C x H x W array),
`label`, `patient_id`. `build_transforms(data, phase)` is the one place where a site's pipeline is
made, one `Compose` per phase:

=========  =====================================================================================
phase      transforms
=========  =====================================================================================
eval       read the file (common.readers) -> scale -> percentile clip -> normalize ->
           pad or crop -> channels
predict    the same as eval (a model sees a new image exactly as it saw its test images)
train      eval, then the random augmentation of `data.augment` (flips, rotation, zoom,
           intensity, noise)
=========  =====================================================================================

A site reads and preprocesses every image once, before training (common.sources caches the
deterministic part on disk); the random part is applied to training batches by `augment_fn`,
which the training loop calls as `augment(batch_x, generator) -> batch_x`.

    python -c "from common.transforms import build_transforms; from common.config import SiteDataConfig; print(build_transforms(SiteDataConfig(format='dicom'), 'train'))"
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    CastToTyped,
    ClipIntensityPercentilesd,
    Compose,
    MapTransform,
    NormalizeIntensityd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    RepeatChanneld,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
)
from monai.utils import convert_to_tensor

from common.readers import read_dicom, read_image, read_nifti
from common.schema import AugmentConfig, PreprocessConfig, SiteDataConfig

PHASES = ("train", "eval", "predict")
READER_VERSION = 1  # bump when reading or preprocessing changes, so cached images are made again

# What LoadSiteImaged adds beside `image` (all plain values, so a cached sample loads with
# torch.load(weights_only=True)).
META_KEYS = ("modality", "file_patient_id", "sop_instance_uid", "spacing", "orig_size", "n_frames", "sha1")


class LoadSiteImaged(MapTransform):
    """Read `image` (a path) with common.readers into a float32 1 x H x W array, and record the
    file's facts a site check reports: modality, patient id and SOP Instance UID in the file,
    pixel spacing, size, number of frames and the SHA-1 of the file's bytes.

    dicom: modality LUT, then `window` (else the file's VOI LUT / window), MONOCHROME1 inverted,
    frame `frame`; pixels in [0, 1]. image: PNG/JPEG grey in [0, 1]. nifti: slice `frame` of the
    volume, mapped through `window` when given, else its own min..max, to [0, 1].
    Unreadable files raise common.readers.BadImageFileError.
    """

    def __init__(self, fmt: str, *, frame: int | str = "middle", window: list[float] | None = None) -> None:
        super().__init__(keys="image")
        if fmt not in ("dicom", "image", "nifti"):
            raise ValueError(f"format {fmt!r}: LoadSiteImaged reads dicom, image or nifti files")
        self.fmt = fmt
        self.frame = frame
        self.window = tuple(float(v) for v in window) if window else None

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        path = Path(d["image"])
        meta = {k: "" for k in META_KEYS} | {"spacing": [], "orig_size": [], "n_frames": 1}
        if self.fmt == "dicom":
            img = read_dicom(path, frame=self.frame, window=self.window)
            pixels = img.pixels
            meta.update(
                modality=img.modality,
                file_patient_id=img.patient_id,
                sop_instance_uid=img.sop_instance_uid,
                spacing=list(img.pixel_spacing) if img.pixel_spacing else [],
                n_frames=img.n_frames,
            )
        elif self.fmt == "image":
            pixels = read_image(path)
        else:
            pixels = read_nifti(path, slice_index=self.frame)
            pixels = _window01(pixels, self.window) if self.window else _min_max01(pixels)
        meta["orig_size"] = list(pixels.shape)
        meta["sha1"] = hashlib.sha1(path.read_bytes()).hexdigest()
        d.update(meta)
        d["image"] = np.ascontiguousarray(pixels, dtype=np.float32)[None]
        return d


def _window01(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    center, width = window
    return np.clip((x - (center - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def _min_max01(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return np.zeros_like(x) if high == low else ((x - low) / (high - low)).astype(np.float32)


class ScaleImaged(MapTransform):
    """MONAI's Resized with the interpolation that suits the direction: area (box averaging, so
    no aliasing) when shrinking, bilinear when enlarging. size_mode as in Resized."""

    def __init__(self, spatial_size: tuple[int, ...] | int, size_mode: str = "all") -> None:
        super().__init__(keys="image")
        self.spatial_size, self.size_mode = spatial_size, size_mode
        self.shrink = Resized("image", spatial_size, size_mode=size_mode, mode="area")
        self.grow = Resized("image", spatial_size, size_mode=size_mode, mode="bilinear")

    def __call__(self, data: dict) -> dict:
        shape = tuple(data["image"].shape[1:])
        if self.size_mode == "longest":
            shrinking = max(shape) >= int(self.spatial_size)  # type: ignore[arg-type]
        else:
            shrinking = all(t <= s for t, s in zip(self.spatial_size, shape, strict=True))  # type: ignore[arg-type]
        return (self.shrink if shrinking else self.grow)(data)


def preprocess_transforms(pre: PreprocessConfig) -> list:
    """The deterministic steps after reading: scale, intensity, then pad or crop, then channels.

    Intensity comes after scaling (cheaper on the smaller image) and before padding (so the padding
    does not enter the percentiles or the mean and standard deviation)."""
    size = tuple(int(v) for v in pre.size)
    steps: list = []
    if size and pre.spatial == "resize":
        steps.append(ScaleImaged(size))
    elif size and pre.spatial == "fit":
        steps.append(ScaleImaged(max(size), size_mode="longest"))
    if pre.percentiles:
        low, high = pre.percentiles
        steps.append(ClipIntensityPercentilesd("image", lower=low, upper=high))
    if pre.normalize == "minmax":
        steps.append(ScaleIntensityd("image", minv=0.0, maxv=1.0))
    elif pre.normalize == "zscore":
        steps.append(NormalizeIntensityd("image"))
    if size and pre.spatial in ("fit", "crop_or_pad"):
        steps.append(ResizeWithPadOrCropd("image", spatial_size=size))
    if pre.channels == 3:
        steps.append(RepeatChanneld("image", repeats=3))
    steps.append(CastToTyped("image", dtype=np.float32))
    return steps


def augment_transforms(aug: AugmentConfig) -> list:
    """The random training steps that `aug` switches on (empty when none is)."""
    p = aug.prob
    steps: list = [RandFlipd("image", prob=p, spatial_axis=axis) for axis in aug.flip]
    if aug.rotate_deg > 0:
        steps.append(
            RandRotated("image", range_x=math.radians(aug.rotate_deg), prob=p, padding_mode="border")
        )
    if aug.zoom:
        low, high = aug.zoom
        steps.append(RandZoomd("image", prob=p, min_zoom=low, max_zoom=high, padding_mode="edge"))
    if aug.intensity > 0:
        steps.append(RandScaleIntensityd("image", factors=aug.intensity, prob=p))
        steps.append(RandShiftIntensityd("image", offsets=aug.intensity, prob=p))
    if aug.noise_std > 0:
        steps.append(RandGaussianNoised("image", prob=p, std=aug.noise_std))
    return steps


def build_transforms(data: SiteDataConfig, phase: str) -> Compose:
    """The site's pipeline for one phase (train, eval, predict), from a path to a model input."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: use one of {PHASES}")
    steps = [LoadSiteImaged(data.format, frame=data.frame, window=data.window)]
    steps += preprocess_transforms(data.preprocess)
    if phase == "train":
        steps += augment_transforms(data.augment)
    return Compose(steps)


def settings_key(data: SiteDataConfig) -> str:
    """A digest of everything that decides a preprocessed image besides the file itself."""
    settings = {
        "reader": READER_VERSION,
        "format": data.format,
        "frame": data.frame,
        "window": list(data.window),
        "preprocess": asdict(data.preprocess),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class BatchAugment:
    """Applies a site's random augmentation to a batch N x C x H x W, sample by sample.

    Reproducible: the MONAI transforms are re-seeded from `generator` for every batch, so the
    same generator state gives the same augmented batch. The batch keeps its device and dtype.
    """

    def __init__(self, steps: list) -> None:
        self.compose = Compose(steps)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if len(x) == 0:
            return x
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.compose.set_random_state(seed=seed)
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata only slows a batch down here
        try:
            out = [convert_to_tensor(self.compose({"image": xi})["image"], track_meta=False) for xi in x]
        finally:
            set_track_meta(tracking)
        return torch.stack(out).to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"BatchAugment({[type(t).__name__ for t in self.compose.transforms]})"


def augment_fn(data: SiteDataConfig) -> BatchAugment | None:
    """The site's training augmentation as `augment(batch_x, generator) -> batch_x`, or None
    when `data.augment` switches nothing on."""
    steps = augment_transforms(data.augment)
    return BatchAugment(steps) if steps else None
