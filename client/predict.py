"""`fedward predict PACKAGE INPUT --out DIR`: a model package's predictions on a hospital's files.

INPUT is a file or a folder (searched recursively) of DICOM, PNG/JPEG or NIfTI files. Each is read by
the reader of its format (common.readers) and preprocessed by the package's own pipeline (the training
sites' `preprocess`, common.transforms), then:

    DIR/predictions.csv        file, SOP Instance UID, Study Instance UID (DICOM), modality, one
                               probability per class, the label, a warning for an image outside what
                               the package was trained for (another modality, too few pixels, a
                               volume: predicted all the same, and marked so in the CSV and the SR),
                               and the error for a file that could not be used (the other files are
                               processed all the same)
    DIR/heatmaps/<name>.png    where the image holds the evidence for the predicted class (below)
    DIR/dicom/<name>-sr.dcm, <name>-sc.dcm   for DICOM inputs: a Structured Report of the finding and
                               its probability, and the heat map as a Secondary Capture (client.dicom_out)

Results go into the same sub-folders as their file has under INPUT (patientA/IM0001 and patientB/IM0001
each get their own); two files of one folder whose results would share a name (IM0001.png, IM0001.jpg)
are not both predicted: the second gets an error saying so. Cells a spreadsheet would take for a
formula (a class, a DICOM header's text or a file's name starting with =, +, -, @) are written with a
leading apostrophe.

The label is the arg-max, or the package's operating point where it has one.

The heat map is MONAI's OcclusionSensitivity: how much the predicted class's probability drops when
a patch around each pixel is hidden. Grad-CAM (MONAI's GradCAM) was tried first and gives nothing on
these networks: with their global average-and-max pooling head its channel weights sum below zero
and its map is zero everywhere (0 of 60 synthetic positives pointed at; occlusion: 52% on the test's
package trained 10 epochs, a random peak 12%, tests/client/test_predict.py).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.transforms import Compose
from monai.visualize import OcclusionSensitivity
from rich.progress import track

from client.dicom_out import write_dicom_results, write_dicom_segmentation
from common.config import preprocess_config
from common.package import PackageError, load_package
from common.readers import READERS, VOLUME_READERS, BadImageFileError, ReadImage, channel_first
from common.transforms import preprocess_transforms


@dataclass
class Prediction:
    file: str
    probabilities: list[float] | None = None
    label: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    modality: str = ""
    heatmap: str = ""
    mask: str = ""  # a segmentation package's predicted label map (NIfTI)
    dicom: list[str] = field(default_factory=list)  # the SR and Secondary Capture written for a DICOM input
    warning: str = ""  # predicted, but outside what the package was trained for (input_warnings)
    error: str = ""


def format_of(path: Path) -> str:
    """The reader format of a file, by its name, or by DICOM's 'DICM' marker for names without one."""
    name = path.name.lower()
    for fmt, reader in READERS.items():
        if reader.suffixes and name.endswith(reader.suffixes):
            return fmt
    with open(path, "rb") as f:
        return "dicom" if f.read(132)[128:] == b"DICM" else ""


def input_files(path: Path, *, series: bool = False) -> list[Path]:
    """The files under `path`; with `series` (a volume package), NIfTI files and every folder that
    holds files (a DICOM series each)."""
    if path.is_file():
        return [path]
    if series:
        folders = [
            d
            for d in [path, *sorted(path.rglob("*"))]
            if d.is_dir()
            and any(f.is_file() and not f.name.endswith((".nii", ".nii.gz")) for f in d.iterdir())
        ]
        return folders + sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.endswith((".nii", ".nii.gz"))
        )
    return sorted(p for p in path.rglob("*") if p.is_file())


class Predictor:
    """A loaded package: preprocessing, model, Grad-CAM and the labelling rule."""

    def __init__(self, package: str | Path, *, site: str = ""):
        """`site`: prepare images as that training site did (the package's `input.sites`); default: as
        the package's first site did."""
        self.model, self.meta = load_package(package)
        reading = self.meta.get("input", {})
        if site:
            sites = reading.get("sites") or {}
            if site not in sites:
                raise PackageError(
                    f"the package has no training site {site!r} to prepare images as; it has {sorted(sites)}"
                )
            reading = {**reading, **sites[site]}
        pre = preprocess_config(reading.get("preprocess", {}), "input.preprocess", str(package))
        self.reading = {"frame": reading.get("frame", "middle"), "window": reading.get("window") or None,
                        "colour": reading.get("colour", "grey")}  # fmt: skip
        self.volume = bool(reading.get("volume", False))  # volumes: NIfTI files and DICOM series folders
        self.task = self.meta.get("task", "classification")
        self.prepare = Compose(preprocess_transforms(pre))
        size = min(pre.size or [28])
        self.classes = list(self.meta["classes"])
        self.occlusion = OcclusionSensitivity(
            nn_module=self.model,
            mask_size=max(3, int(size) // 6) | 1,
            n_batch=64,
            overlap=0.6,
            mode="mean_img",
            activate=True,  # class probabilities (softmax), as `heatmap` compares them
            verbose=False,
        )
        self.operating_point = self.meta.get("operating_point") or None
        self.modalities = [m.upper() for m in self.meta.get("input", {}).get("modalities") or []]
        self.size = list(pre.size)

    def input_warnings(self, image: ReadImage) -> list[str]:
        """Why this image is outside what the model was trained for: another modality, fewer pixels
        than the model's input (it would be upsampled), or a volume of which one frame is used."""
        found = []
        if self.modalities and image.modality and image.modality.upper() not in self.modalities:
            found.append(f"modality {image.modality}, the model is for {'/'.join(self.modalities)} only")
        rows, cols = image.pixels.shape[-2:] if image.volume else image.pixels.shape[:2]
        want = self.size[-2:]
        if want and (rows < want[0] or cols < want[1]):
            found.append(f"{rows}x{cols} pixels, smaller than the model's {want[0]}x{want[1]} input")
        if image.n_frames > 1 and not image.volume:
            found.append(f"{image.n_frames} frames: one was predicted")
        if image.colour_file and self.reading["colour"] == "grey":
            found.append("a colour image, read as grey: the model was trained on grey images")
        return found

    def tensor(self, image: ReadImage) -> torch.Tensor:
        return torch.as_tensor(self.prepare({"image": channel_first(image)})["image"]).float()[None]

    def label(self, probs: np.ndarray) -> str:
        op = self.operating_point
        if op and len(self.classes) == 2:
            return self.classes[1] if probs[1] >= float(op["threshold"]) else self.classes[0]
        return self.classes[int(np.argmax(probs))]

    def _segmented(self, out: Prediction, path: Path, image: ReadImage, label_map: np.ndarray,
                   masks: Path | None, dicom_out: Path | None) -> Prediction:  # fmt: skip
        """A segmentation's row: each class's share of the image, the largest foreground class present
        (else the background) as the label, and the label map back at the image's own size (nearest
        neighbour: exact for `spatial: resize`, the default) as NIfTI and, for DICOM, DICOM-SEG."""
        from scipy.ndimage import zoom

        shape = image.pixels.shape if image.volume else image.pixels.shape[:2]  # the image's own grid
        full = zoom(label_map, [n / m for n, m in zip(shape, label_map.shape, strict=True)], order=0)
        shares = np.bincount(full.ravel(), minlength=len(self.classes)) / full.size
        out.probabilities = [float(v) for v in shares]
        found = [c for c in range(1, len(self.classes)) if shares[c] > 0]
        out.label = self.classes[max(found, key=lambda c: shares[c])] if found else self.classes[0]
        out.warning = "; ".join(self.input_warnings(image))
        if masks is not None:
            import nibabel as nib

            masks.mkdir(parents=True, exist_ok=True)
            target = masks / f"{path.stem}-mask.nii.gz"
            # back into NIfTI's own layout (the inverse of common.readers' NIfTI slice and volume layout)
            stored = full.transpose(2, 1, 0)[::-1, ::-1, :] if image.volume else full.T[::-1, ::-1]
            nib.save(nib.Nifti1Image(np.ascontiguousarray(stored).astype(np.uint8), np.eye(4)), target)
            out.mask = str(target)
        if dicom_out is not None and (image.slice_uids or not image.volume):  # a file, or a DICOM series
            try:
                written = write_dicom_segmentation(
                    path, full, self.classes, dicom_out, slice_uids=image.slice_uids
                )
                out.dicom = [str(written)]
            except (AttributeError, ValueError, TypeError) as err:
                out.error = f"segmented, but its header lacks what a DICOM-SEG needs ({err})"
        return out

    def heatmap(self, x: torch.Tensor, class_index: int) -> np.ndarray:
        """How much hiding each pixel's neighbourhood lowers `class_index`'s probability, H x W in [0, 1]
        (scaled to its largest drop)."""
        with torch.no_grad():
            prob = float(torch.softmax(self.model(x), dim=1)[0, class_index])
            occluded, _ = self.occlusion(x)
        drop = np.clip(prob - occluded[0, class_index].numpy(), 0, None)
        return drop / drop.max() if drop.max() > 0 else drop

    def _read(self, path: Path, out: Prediction) -> tuple[str, ReadImage | None]:
        """The input's format and image, or (format, None) with `out.error` saying why it cannot be used."""
        fmt = "dicom" if path.is_dir() else format_of(path)
        if not fmt or (self.volume and fmt not in VOLUME_READERS):
            out.error = (
                "not a DICOM series folder or NIfTI volume"
                if self.volume
                else "not a DICOM, PNG/JPEG or NIfTI file"
            )
            return fmt, None
        if path.is_dir() and not self.volume:
            out.error = "a folder: this package takes 2-D images, one file each"
            return fmt, None
        try:
            if self.volume:
                image = VOLUME_READERS[fmt](window=self.reading["window"]).read(path)
            else:
                image = READERS[fmt](**self.reading).read(path)
        except BadImageFileError as err:
            out.error = err.reason
            return fmt, None
        out.sop_instance_uid, out.modality = image.sop_instance_uid, image.modality
        if fmt == "dicom" and not image.volume:
            out.study_instance_uid = str(
                pydicom.dcmread(path, stop_before_pixels=True).get("StudyInstanceUID", "")
            )
        return fmt, image

    def predict_file(
        self, path: Path, heatmaps: Path | None, dicom_out: Path | None = None, masks: Path | None = None
    ) -> Prediction:
        """One file's prediction; a heat map PNG into `heatmaps`, and for DICOM the SR and the heat-map
        Secondary Capture into `dicom_out` (client.dicom_out), when given. A segmentation package writes
        the predicted label map instead, as NIfTI into `masks` and, for DICOM, as DICOM-SEG."""
        out = Prediction(str(path))
        fmt, image = self._read(path, out)
        if image is None:
            return out
        x = self.tensor(image)
        with torch.no_grad():
            probs = torch.softmax(self.model(x), dim=1)[0].numpy()
        if self.task == "segmentation":
            return self._segmented(
                out, path, image, probs.argmax(axis=0), masks, dicom_out if fmt == "dicom" else None
            )
        out.probabilities, out.label = [float(p) for p in probs], self.label(probs)
        out.warning = "; ".join(self.input_warnings(image))
        if image.volume:  # no heat map or DICOM results for volumes yet (README)
            return out
        dicom_out = dicom_out if fmt == "dicom" else None
        heat = self.heatmap(x, self.classes.index(out.label)) if heatmaps or dicom_out else None
        if heatmaps is not None:
            shown = x[0].permute(1, 2, 0).numpy() if x.shape[1] == 3 else x[0, 0].numpy()
            out.heatmap = str(save_heatmap(heatmaps / f"{path.stem}.png", shown, heat))
        if dicom_out is not None:
            try:
                written = write_dicom_results(
                    path,
                    image.pixels,
                    heat,
                    self.classes,
                    out.probabilities,
                    out.label,
                    dicom_out,
                    warning=out.warning,
                )
                out.dicom = [str(p) for p in written]
            except (AttributeError, ValueError, TypeError) as err:  # a header without e.g. PatientName
                out.error = f"predicted, but its header lacks what a DICOM report needs ({err})"
        return out


def save_heatmap(path: Path, image: np.ndarray, cam: np.ndarray) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    ax.imshow(np.clip(image, 0, 1), cmap="gray")  # H x W grey, or H x W x 3 colour
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    return path


def predict(
    package: str | Path, inputs: str | Path, out_dir: str | Path, *, heatmaps: bool = True, site: str = ""
) -> Path:
    """Predict on every file under `inputs` (prepared as training site `site` did, default the first);
    returns the path of predictions.csv."""
    predictor, out, inputs = Predictor(package, site=site), Path(out_dir), Path(inputs)
    out.mkdir(parents=True, exist_ok=True)
    files = input_files(inputs, series=predictor.volume)
    root = inputs if inputs.is_dir() else inputs.parent
    named: dict[tuple[Path, str], Path] = {}  # (folder under INPUT, stem): the file whose results have them
    rows = []
    for path in track(files, description="predicting", disable=len(files) < 20):
        folder = path.relative_to(root).parent if path != root else Path()  # results mirror INPUT's folders
        if (folder, path.stem) in named:  # never one patient's results under another's name
            rows.append(Prediction(str(path), error=f"its results would have the names of those of "
                                   f"{named[folder, path.stem]} (same folder, same name): rename one"))  # fmt: skip
            continue
        named[folder, path.stem] = path
        rows.append(predictor.predict_file(path, out / "heatmaps" / folder if heatmaps else None,
                                           out / "dicom" / folder, out / "masks" / folder))  # fmt: skip
    csv_path = out / "predictions.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "sop_instance_uid", "study_instance_uid", "modality",
                    *(f"p_{c}" for c in predictor.classes), "label", "heatmap", "mask", "dicom_results", "warning",
                    "error"])  # fmt: skip
        for r in rows:
            probs = (
                [f"{p:.6f}" for p in r.probabilities] if r.probabilities else [""] * len(predictor.classes)
            )
            w.writerow(
                [
                    spreadsheet_text(text)
                    for text in (r.file, r.sop_instance_uid, r.study_instance_uid, r.modality, *probs, r.label,
                                 r.heatmap, r.mask, ";".join(r.dicom), r.warning, r.error)
                ]
            )  # fmt: skip
    return csv_path


def spreadsheet_text(value: str) -> str:
    """`value` as a spreadsheet shows it as text: one that starts as a formula would (=, +, -, @; a
    class name from a package, a DICOM header's text, a file's name) gets a leading apostrophe."""
    return "'" + value if value.startswith(("=", "+", "-", "@", "\t", "\r")) else value
