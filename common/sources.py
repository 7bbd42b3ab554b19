"""A hospital's own files as site data: DICOM, PNG/JPEG or NIfTI in a folder, plus a labels CSV.

`scan_site(config)` does all the work and never stops at a bad file: it reads the label sheet
(common.readers.read_labels_csv), finds each row's file (by `file` path or by SOP Instance UID),
reads and preprocesses every image once (common.transforms, `eval` phase), splits by patient
(common.readers.patient_split with `data.split_seed` and `data.split_fractions`, or the sheet's
own `split` column) and returns a `SourceReport`: the usable samples and their tensors, and
everything that was wrong, file by file. `load_folder_site(config)` is the `LOADERS` entry for
the formats dicom, image and nifti: it logs the skipped files and returns `SiteData`, or raises
`SiteDataError` when the data cannot be used (`SourceReport.usable`).

What makes a file or row bad (left out and reported with `on_bad_file: skip`; with `fail` any of
them makes the data unusable): a file that is corrupt or truncated, not DICOM (or not an image /
NIfTI), has no pixel data or a compression no installed plugin decodes, a row whose file does
not exist, a label that is empty or not in `data.classes`, and a second copy of an image already
used (same bytes, or same SOP Instance UID). What makes the data unusable whatever the policy: a
missing folder or sheet, a sheet with a structural error, a patient whose rows the sheet puts in
two splits, images of different sizes with `preprocess.size: []`, no training or no test image.

Caching: decoded, preprocessed images are kept in `<state_dir>/cache/images` with MONAI's
PersistentDataset, one file per image, keyed by the file's path, size and modification time and
by the reading and preprocessing settings (`common.transforms.settings_key`), so a restarted
site (or the next process of a simulation) does not decode its DICOM files again. Entries no
longer used are removed. Without a state_dir (or with `data.cache: false`) nothing is cached.

    python -c "from common.config import load_site; from common.sources import scan_site; print(scan_site(load_site('site.yaml')).summary())"
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.data import PersistentDataset
from monai.utils import convert_to_tensor

from common.readers import SPLITS, BadImageFileError, LabelFileError, LabelRow, patient_split, read_labels_csv
from common.schema import SiteConfig, SiteDataConfig
from common.sitedata import SiteData, SiteDataError
from common.transforms import build_transforms, settings_key

log = logging.getLogger("fedward.site")

FOLDER_FORMATS = ("dicom", "image", "nifti")
_SUFFIXES = {"image": (".png", ".jpg", ".jpeg"), "nifti": (".nii", ".nii.gz")}
CACHE_SUBDIR = Path("cache") / "images"


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
    sop_instance_uid: str = ""
    file_patient_id: str = ""  # Patient ID inside the DICOM file ("" for other formats)
    sha1: str = ""


@dataclass
class SourceReport:
    """Everything `scan_site` found; `usable` says whether the site can train on it."""

    site: str
    format: str
    root: Path
    labels: Path
    classes: list[str]
    on_bad_file: str
    samples: list[Sample] = field(default_factory=list)
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
                f"(first: {_describe(self.bad[0])}); fix or remove them, or set on_bad_file: skip"
            )
        return out

    def count(self, split: str, label_index: int | None = None) -> int:
        return sum(
            1
            for s in self.samples
            if s.split == split and (label_index is None or s.label_index == label_index)
        )

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
        parts = {}
        for split in SPLITS:
            idx = [i for i, s in enumerate(self.samples) if s.split == split]
            y = torch.tensor([self.samples[i].label_index for i in idx], dtype=torch.int64)
            parts[split] = (self.images[idx].contiguous(), y)
        has_val = len(parts["val"][1]) > 0
        notes = list(self.notes)
        if self.bad:
            notes.append(
                f"skipped {len(self.bad)} bad file(s) or row(s) (on_bad_file: skip): "
                + ", ".join(f"{b.file} ({b.problem})" for b in self.bad)
            )
        return SiteData(
            site=self.site,
            train_x=parts["train"][0],
            train_y=parts["train"][1],
            test_x=parts["test"][0],
            test_y=parts["test"][1],
            val_x=parts["val"][0] if has_val else None,
            val_y=parts["val"][1] if has_val else None,
            classes=list(self.classes),
            notes=notes,
        )


def _describe(bad: BadFile) -> str:
    where = f" (labels line {bad.line})" if bad.line else ""
    return f"{bad.file}{where}: {bad.problem}"


# ----------------------------------------------------------------------------- loading


def load_folder_site(config: SiteConfig) -> SiteData:
    """LOADERS entry for dicom, image and nifti: the site's data, or SiteDataError saying why not."""
    report = scan_site(config)
    log_report(report)
    if not report.usable:
        raise SiteDataError(
            f"site '{config.site}': its {config.data.format} data cannot be used: "
            + "; ".join(report.reasons())
            + f". Run `fedward site check {config.source_path or 'SITE_CONFIG'}` for the full report."
        )
    return report.to_site_data()


def log_report(report: SourceReport) -> None:
    """The site's log: a summary line, then one line per skipped file or row."""
    log.info(report.summary())
    if report.bad:
        log.warning(
            "site '%s': %d bad file(s) or row(s) %s",
            report.site,
            len(report.bad),
            "skipped (on_bad_file: skip)" if report.on_bad_file == "skip" else "(on_bad_file: fail)",
        )
        for bad in report.bad:
            log.warning("site '%s': %s: %s", report.site, _describe(bad), bad.detail)
    if report.unlabelled:
        log.info(
            "site '%s': %d file(s) have no label row and are not used", report.site, len(report.unlabelled)
        )


def site_paths(config: SiteConfig) -> tuple[Path, Path]:
    """The image folder and label sheet; relative paths are relative to the site config's folder."""
    base = Path(config.source_path).parent if config.source_path else Path.cwd()

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    return resolve(config.data.root), resolve(config.data.labels)


def cache_dir(config: SiteConfig) -> Path | None:
    if not config.data.cache or not config.state_dir:
        return None
    return Path(config.state_dir).expanduser() / CACHE_SUBDIR


def scan_site(config: SiteConfig) -> SourceReport:
    """Read, check, preprocess and split a site's folder of files (see the module docstring)."""
    t0 = time.perf_counter()
    data = config.data
    if data.format not in FOLDER_FORMATS:
        raise ValueError(f"scan_site reads the formats {FOLDER_FORMATS}, not {data.format!r}")
    root, labels = site_paths(config)
    report = SourceReport(config.site, data.format, root, labels, list(data.classes), data.on_bad_file)
    if not root.is_dir():
        report.fatal.append(f"the image folder '{root}' does not exist; set 'data.root' to the export folder")
    if not labels.is_file():
        report.fatal.append(f"the label sheet '{labels}' does not exist; set 'data.labels' to the CSV")
    if report.fatal:
        return report
    try:
        rows, bad_rows = _read_rows(labels, data, report)
    except LabelFileError as err:
        report.fatal.append(f"label sheet: {err}")
        return report

    on_disk = _list_files(root, data.format, exclude=labels)
    by_row, wanted = _files_for_rows(rows, root, bad_rows, report)
    uid_rows = [i for i, r in enumerate(rows) if r.file is None and i not in bad_rows]
    candidates = sorted(set(on_disk) - set(wanted)) if uid_rows else []
    decoded = _decode(config, root, sorted(set(wanted) | set(candidates)), report)

    if uid_rows:  # rows that name only a SOP Instance UID: find it among the other files
        by_uid = {}
        for rel in candidates:
            if rel in decoded and decoded[rel]["sop_instance_uid"]:
                by_uid.setdefault(decoded[rel]["sop_instance_uid"], rel)
        for i in uid_rows:
            uid = rows[i].sop_instance_uid
            if uid in by_uid:
                by_row[i] = by_uid[uid]
            else:
                report.bad.append(
                    BadFile(
                        uid,
                        "file not found",
                        f"no readable file in '{root}' has SOP Instance UID {uid}",
                        rows[i].line,
                    )
                )
    used = set(by_row.values())
    report.unlabelled = [rel for rel in on_disk if rel not in used and rel not in _bad_files(report)]

    split_of = _splits(rows, data, report)
    keep: list[int] = []
    seen_sha: dict[str, str] = {}
    seen_uid: dict[str, str] = {}
    for i in sorted(by_row, key=lambda i: rows[i].line):
        rel, row = by_row[i], rows[i]
        item = decoded.get(rel)
        if item is None:
            continue  # unreadable: already reported
        first = seen_sha.get(item["sha1"]) or (
            item["sop_instance_uid"] and seen_uid.get(item["sop_instance_uid"])
        )
        if first:
            report.bad.append(
                BadFile(
                    rel,
                    "duplicate",
                    f"the same image as '{first}' (same bytes or SOP Instance UID); remove one",
                    row.line,
                )
            )
            continue
        seen_sha[item["sha1"]] = rel
        if item["sop_instance_uid"]:
            seen_uid[item["sop_instance_uid"]] = rel
        keep.append(i)
        report.samples.append(
            Sample(
                file=rel,
                patient_id=row.patient_id,
                label=row.label,
                label_index=row.label_index,
                split=split_of[i],
                line=row.line,
                modality=str(item["modality"]),
                orig_size=tuple(int(v) for v in item["orig_size"]),
                spacing=tuple(float(v) for v in item["spacing"]),
                n_frames=int(item["n_frames"]),
                sop_instance_uid=str(item["sop_instance_uid"]),
                file_patient_id=str(item["file_patient_id"]),
                sha1=str(item["sha1"]),
            )
        )
    line_of = {rel: rows[i].line for i, rel in by_row.items()}
    for bad in report.bad:  # a file that failed to decode: point at the row that names it
        bad.line = bad.line or line_of.get(bad.file)
    report.bad.sort(key=lambda b: (b.line or 0, b.file))
    _stack(report, [decoded[by_row[i]]["image"] for i in keep], data)
    _final_checks(report)
    report.seconds = time.perf_counter() - t0
    return report


def _bad_files(report: SourceReport) -> set[str]:
    return {b.file for b in report.bad}


def _read_rows(path: Path, data: SiteDataConfig, report: SourceReport) -> tuple[list[LabelRow], set[int]]:
    """The label sheet's rows, and the indices of rows left out. With on_bad_file: skip, a row whose label is empty or not in
    `classes` is reported and left out of training (it still takes part in the patient split,
    so correcting it later moves no other patient); with fail it raises LabelFileError."""
    classes = list(data.classes)
    if data.on_bad_file == "fail":
        return read_labels_csv(path, classes=classes), set()
    extra = sorted(_label_values(path) - set(classes))
    rows = read_labels_csv(path, classes=classes + extra)
    bad_rows = set()
    for i, row in enumerate(rows):
        if row.label_index >= len(classes):
            name = row.file or row.sop_instance_uid or "?"
            if row.label:
                problem, detail = "unknown label", f"label '{row.label}' is not one of {classes}"
            else:
                problem, detail = "missing label", "the row has no label"
            report.bad.append(
                BadFile(name, problem, detail + "; fix the row or the site's classes", row.line)
            )
            bad_rows.add(i)
    return rows, bad_rows


def _label_values(path: Path) -> set[str]:
    """Every value of the sheet's `label` column (read_labels_csv reports the sheet's errors)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [h.strip().lower() for h in next(reader, [])]
        col = header.index("label")
        return {r[col].strip() for r in reader if len(r) == len(header) and any(v.strip() for v in r)}
    except (UnicodeDecodeError, csv.Error, ValueError):
        return set()


def _list_files(root: Path, fmt: str, *, exclude: Path) -> list[str]:
    """Files under `root` a site of this format would read, relative, sorted; hidden files,
    DICOMDIR and the label sheet itself are left out."""
    out = []
    skip = exclude.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            p = Path(dirpath) / name
            if p.resolve() == skip:
                continue
            if fmt in _SUFFIXES and not name.lower().endswith(_SUFFIXES[fmt]):
                continue
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _files_for_rows(
    rows: list[LabelRow], root: Path, bad_rows: set[int], report: SourceReport
) -> tuple[dict[int, str], list[str]]:
    """Row index -> file (relative to root) for rows that name a file that exists; rows whose
    file is missing are reported and added to `bad_rows`."""
    by_row, wanted = {}, []
    for i, row in enumerate(rows):
        if row.file is None or i in bad_rows:
            continue
        path = root / row.file
        if not path.is_file():
            report.bad.append(BadFile(row.file, "file not found", f"'{path}' does not exist", row.line))
            bad_rows.add(i)
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        by_row[i] = rel
        wanted.append(rel)
    return by_row, wanted


_PROBLEMS = (
    ("not a DICOM file", "not DICOM"),
    ("has no pixel data", "no pixel data"),
    ("truncated", "truncated"),
    ("no installed plugin", "unsupported compression"),
    ("no pixel data decoder", "unsupported compression"),
    ("not an image PIL can read", "not an image"),
    ("not a NIfTI file", "not NIfTI"),
)


def _problem(err: BadImageFileError) -> str:
    return next((short for text, short in _PROBLEMS if text in err.reason), "corrupt")


def _decode(config: SiteConfig, root: Path, files: list[str], report: SourceReport) -> dict[str, dict]:
    """Read and preprocess `files` (cached); unreadable ones go to report.bad. rel -> sample."""
    key = settings_key(config.data)
    items, present = [], []
    for rel in files:
        try:
            st = (root / rel).stat()
        except OSError as err:  # gone since the folder was listed, or unreadable
            report.bad.append(BadFile(rel, "file not found", f"'{root / rel}' cannot be opened ({err})"))
            continue
        items.append({"image": str(root / rel), "stamp": f"{st.st_size}:{st.st_mtime_ns}", "settings": key})
        present.append(rel)
    files = present
    folder = cache_dir(config)
    ds = PersistentDataset(items, transform=build_transforms(config.data, "eval"), cache_dir=folder)
    out, current = {}, set()
    for i, rel in enumerate(files):
        cached = None
        if folder is not None:
            cached = folder / f"{ds.hash_func(items[i]).decode('utf-8')}{ds.transform_hash}.pt"
            current.add(cached.name)
            hit = cached.is_file()
        try:
            sample = ds[i]
        except MemoryError:
            raise
        except Exception as exc:  # one bad file must not stop the site: report it
            err = _root_cause(exc)
            if isinstance(err, BadImageFileError):
                detail = str(err).removeprefix(f"{root / rel}: ")
                report.bad.append(BadFile(rel, _problem(err), detail))
            elif isinstance(err, FileNotFoundError):
                report.bad.append(BadFile(rel, "file not found", f"'{root / rel}' disappeared while reading"))
            else:
                report.bad.append(BadFile(rel, "corrupt", f"cannot be read ({type(err).__name__}: {err})"))
            continue
        if cached is not None and hit:
            report.from_cache += 1
        else:
            report.decoded += 1
        out[rel] = sample
    if folder is not None and folder.is_dir():
        for old in folder.glob("*.pt"):
            if old.name not in current:
                old.unlink(missing_ok=True)
    return out


def _root_cause(exc: BaseException) -> BaseException:
    """MONAI wraps a transform's error in RuntimeError('applying transform ...'); unwrap it."""
    seen = exc
    while seen.__cause__ is not None:
        if isinstance(seen, BadImageFileError):
            return seen
        seen = seen.__cause__
    return seen


def _splits(rows: list[LabelRow], data: SiteDataConfig, report: SourceReport) -> list[str]:
    """Each row's split, by patient. All rows count (bad ones too), so fixing a bad file or label
    later does not move any other patient. Patients the sheet puts in two splits are fatal."""
    given: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split:
            given[row.patient_id].add(row.split)
    report.split_conflicts = {p: sorted(s) for p, s in given.items() if len(s) > 1}
    if report.split_conflicts:
        names = ", ".join(f"{p} ({'/'.join(s)})" for p, s in sorted(report.split_conflicts.items())[:5])
        report.fatal.append(
            f"{len(report.split_conflicts)} patient(s) have rows in more than one split in the sheet's "
            f"'split' column: {names}; one patient must stay in one split"
        )
        rows = [
            dataclasses.replace(r, split=None) if r.patient_id in report.split_conflicts else r for r in rows
        ]
    fractions = tuple(float(f) for f in data.split_fractions)
    assignment = patient_split(rows, seed=data.split_seed, fractions=fractions)  # type: ignore[arg-type]
    split_of = [""] * len(rows)
    for split, indices in assignment.items():
        for i in indices:
            split_of[i] = split
    return split_of


def _stack(report: SourceReport, images: list, data: SiteDataConfig) -> None:
    if not images:
        return
    tensors = [convert_to_tensor(x, track_meta=False, dtype=torch.float32) for x in images]
    shapes = Counter(tuple(t.shape) for t in tensors)
    if len(shapes) > 1:
        sizes = ", ".join(f"{'x'.join(map(str, s[1:]))} ({n})" for s, n in shapes.most_common(5))
        report.fatal.append(
            f"the images differ in size ({sizes}) and 'data.preprocess.size' is []; "
            f"set it, e.g. [128, 128], to resize them alike"
        )
        return
    report.images = torch.stack(tensors)


def _final_checks(report: SourceReport) -> None:
    if not report.samples:
        report.fatal.append("no usable image: every row's file is missing or unreadable")
        return
    for split, what in (("train", "training"), ("test", "test")):
        if report.count(split) == 0:
            report.fatal.append(
                f"no {what} image: the {split} split is empty ({len(report.patients())} patients); add "
                f"patients or change 'data.split_fractions' / the sheet's split column"
            )
    mismatched = [s for s in report.samples if s.file_patient_id and s.file_patient_id != s.patient_id]
    if mismatched:
        s = mismatched[0]
        report.notes.append(
            f"{len(mismatched)} file(s) carry a Patient ID other than their row's patient_id (e.g. "
            f"{s.file}: file '{s.file_patient_id}', sheet '{s.patient_id}'); the sheet's is used for splits"
        )


def preprocess_file(path: str | os.PathLike[str], data: SiteDataConfig) -> torch.Tensor:
    """One file as the model sees it (the `predict` phase): C x H x W float32.
    Raises common.readers.BadImageFileError for a file that cannot be read."""
    try:
        out = build_transforms(data, "predict")({"image": str(path)})["image"]
    except Exception as exc:
        err = _root_cause(exc)
        if isinstance(err, BadImageFileError):
            raise err from None  # the reader's message, not MONAI's wrapper
        raise
    return convert_to_tensor(out, track_meta=False, dtype=torch.float32)


def stats(report: SourceReport) -> dict[str, Counter]:
    """What the site check shows about the images: modality, stored size, spacing, frames."""

    def spacing(s: Sample) -> str:
        return f"{s.spacing[0]:.3g} x {s.spacing[1]:.3g} mm" if s.spacing else "unknown"

    return {
        "modality": Counter(s.modality or "-" for s in report.samples),
        "size": Counter("x".join(map(str, s.orig_size)) for s in report.samples),
        "spacing": Counter(spacing(s) for s in report.samples),
        "frames": Counter(str(s.n_frames) for s in report.samples),
    }


__all__ = [
    "FOLDER_FORMATS",
    "BadFile",
    "Sample",
    "SourceReport",
    "load_folder_site",
    "preprocess_file",
    "scan_site",
    "stats",
]
