"""MONAI dictionary transforms built from a site config: reading, preprocessing, augmentation.

Samples are dictionaries: `image` (a file path before reading, then a 1 x H x W or C x H x W array)
and the facts read from the file (modality, patient id and SOP Instance UID in the file, spacing,
stored size, frames, SHA-1). Two parts, each built in one place:

- `build_transforms(data)`: the deterministic pipeline, one `Compose`, the same for training,
  evaluation and prediction (a model sees a new image exactly as it saw its test images):
  read the file (`LoadSiteImaged`, with the reader of `data.format` from common.readers) ->
  scale -> percentile clip -> normalize -> pad or crop -> channels.
- `augment_fn(data)`: the random augmentation of `data.augment` (flips, rotation, zoom,
  intensity, noise), called by the training loop on training batches as
  `augment(batch_x, generator) -> batch_x`.

A site reads and preprocesses every image once, before training (common.sources caches the
deterministic part on disk, keyed by `settings_key`).

    python -c "from common.transforms import build_transforms; from common.schema import SiteDataConfig; print([type(t).__name__ for t in build_transforms(SiteDataConfig(format='dicom')).transforms])"
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
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
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

from common.readers import channel_first, reader_for
from common.readers.volume import folder_sha1
from common.schema import AugmentConfig, PreprocessConfig, SiteDataConfig

READER_VERSION = 4  # bump when reading or preprocessing changes, so cached images are made again


class LoadSiteImaged(MapTransform):
    """Read `image` (a path) with the site's reader (common.readers.reader_for) into a float32
    1 x H x W (grey) or 3 x H x W (colour kept) array in [0, 1], and record the file's facts a site check reports: modality,
    patient id and SOP Instance UID in the file, pixel spacing, size, number of frames, the acquisition
    metadata (DICOM: manufacturer, model, kVp, photometric interpretation, date) and the SHA-1 of the
    file's bytes. The facts are plain values (str, int, lists), so a cached sample
    loads with torch.load(weights_only=True). Unreadable files raise common.readers.BadImageFileError.
    """

    def __init__(self, data: SiteDataConfig) -> None:
        super().__init__(keys="image")
        self.reader = reader_for(data)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        path = Path(d["image"])
        img = self.reader.read(path)
        d.update(
            modality=img.modality,
            file_patient_id=img.patient_id,
            sop_instance_uid=img.sop_instance_uid,
            spacing=list(img.voxel_spacing or img.pixel_spacing or []),
            orig_size=list(img.pixels.shape),
            n_frames=img.n_frames,
            colour_file=img.colour_file,
            slice_uids=list(img.slice_uids),
            acquisition=dict(img.acquisition),
            sha1=folder_sha1(path) if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest(),
        )
        d["image"] = channel_first(img)
        return d


class GreyToChannelsd(MapTransform):
    """A grey image's one channel repeated to `channels` (for 3-channel networks); an image that already
    has them (colour, `data.colour: rgb`) passes unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__(keys="image")
        self.repeat = RepeatChanneld("image", repeats=channels)
        self.channels = channels

    def __call__(self, data: dict) -> dict:
        return self.repeat(data) if data["image"].shape[0] == 1 and self.channels > 1 else data


class ScaleImaged(MapTransform):
    """MONAI's Resized with the interpolation that suits the direction: area (box averaging, so
    no aliasing) when shrinking, bilinear (trilinear for volumes) when enlarging. size_mode as in Resized."""

    def __init__(self, spatial_size: tuple[int, ...] | int, size_mode: str = "all") -> None:
        super().__init__(keys="image")
        self.spatial_size, self.size_mode = spatial_size, size_mode
        grow = "trilinear" if isinstance(spatial_size, tuple) and len(spatial_size) == 3 else "bilinear"
        self.shrink = Resized("image", spatial_size, size_mode=size_mode, mode="area")
        self.grow = Resized("image", spatial_size, size_mode=size_mode, mode=grow)

    def __call__(self, data: dict) -> dict:
        shape = tuple(data["image"].shape[1:])
        if self.size_mode == "longest":
            shrinking = max(shape) >= int(self.spatial_size)  # type: ignore[arg-type]
        else:
            shrinking = all(t <= s for t, s in zip(self.spatial_size, shape, strict=True))  # type: ignore[arg-type]
        return (self.shrink if shrinking else self.grow)(data)


class ResampleToSpacingd(MapTransform):
    """A volume resampled to `spacing` (slice, row, col in mm) from the spacing its file gave (the
    sample's `spacing` fact), trilinear with MONAI's Resized: the voxel grids are axis-aligned, so
    this is MONAI's Spacing without an affine to carry."""

    def __init__(self, spacing: tuple[float, ...]) -> None:
        super().__init__(keys="image")
        self.spacing = tuple(float(v) for v in spacing)

    def __call__(self, data: dict) -> dict:
        have = data.get("spacing") or []
        if len(have) != 3:
            raise ValueError(
                "the volume's file gives no slice spacing to resample from (data.preprocess.spacing)"
            )
        shape = tuple(data["image"].shape[1:])
        size = tuple(max(1, round(n * h / t)) for n, h, t in zip(shape, have, self.spacing, strict=True))
        return Resized("image", size, mode="trilinear")(data) if size != shape else data


def intensity_steps(pre: PreprocessConfig) -> list:
    """The per-image intensity normalization `pre.normalize` asks for (MONAI), or none."""
    if pre.normalize == "minmax":
        return [ScaleIntensityd("image", minv=0.0, maxv=1.0)]
    if pre.normalize == "zscore":
        return [NormalizeIntensityd("image")]
    return []


def normalize_images(images: np.ndarray, pre: PreprocessConfig) -> np.ndarray:
    """Each image of an array (N x ...) through `pre.normalize`: the same MONAI step a file site's
    pipeline runs, for the sites whose images come as arrays (synthetic, MedMNIST)."""
    steps = intensity_steps(pre)
    if not steps:
        return images
    compose = Compose(steps)
    out = [np.asarray(compose({"image": torch.from_numpy(np.ascontiguousarray(x))})["image"]) for x in images]
    return np.stack(out).astype(np.float32) if out else images


def preprocess_transforms(pre: PreprocessConfig) -> list:
    """The deterministic steps after reading: scale, intensity, then pad or crop, then channels.

    Intensity comes after scaling (cheaper on the smaller image) and before padding (so the padding
    does not enter the percentiles or the mean and standard deviation)."""
    size = tuple(int(v) for v in pre.size)
    steps: list = [ResampleToSpacingd(tuple(pre.spacing))] if pre.spacing else []
    if size and pre.spatial == "resize":
        steps.append(ScaleImaged(size))
    elif size and pre.spatial == "fit":
        steps.append(ScaleImaged(max(size), size_mode="longest"))
    if pre.percentiles:
        low, high = pre.percentiles
        steps.append(ClipIntensityPercentilesd("image", lower=low, upper=high))
    steps += intensity_steps(pre)
    if size and pre.spatial in ("fit", "crop_or_pad"):
        steps.append(ResizeWithPadOrCropd("image", spatial_size=size))
    if pre.channels == 3:
        steps.append(GreyToChannelsd(3))
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


def acquisition_transforms(prob: float = 0.8) -> list:
    """Harmonization by augmentation: each image re-rendered as another scanner might (MONAI): blur,
    gamma, gain, offset and noise of the ranges the simulated scanners span (common.scanners), so a
    model meets the acquisition shift of a hospital it never trained at. Intensities stay in [0, 1]."""
    return [
        RandGaussianSmoothd(
            "image", sigma_x=(0.0, 1.2), sigma_y=(0.0, 1.2), sigma_z=(0.0, 1.2), prob=prob / 2
        ),
        RandAdjustContrastd("image", gamma=(0.7, 1.45), prob=prob),
        RandScaleIntensityd("image", factors=0.2, prob=prob),
        RandShiftIntensityd("image", offsets=0.1, prob=prob),
        RandGaussianNoised("image", std=0.06, prob=prob / 2),
        ClampIntensityd(),
    ]


class ClampIntensityd(MapTransform):
    """Intensities back to [0, 1] (after gain, offset and noise)."""

    def __init__(self) -> None:
        super().__init__(keys="image")

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d["image"] = (
            d["image"].clamp(0.0, 1.0) if hasattr(d["image"], "clamp") else np.clip(d["image"], 0.0, 1.0)
        )
        return d


def build_transforms(data: SiteDataConfig) -> Compose:
    """The site's deterministic pipeline, from a file's path to a model input (C x H x W)."""
    return Compose([LoadSiteImaged(data), *preprocess_transforms(data.preprocess)])


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
