"""A hospital's own files as site data: DICOM, PNG/JPEG or NIfTI in a folder, plus a labels CSV.

`scan_site(config)` never stops at a bad file: it reads the label sheet (common.labels), finds
each row's file (by `file` path or SOP Instance UID), reads and preprocesses every image once
(common.transforms.build_transforms, with the reader common.readers has for `data.format`),
splits by patient and returns a `SourceReport`: the usable samples and their tensors, and what
was wrong, file by file. `load_folder_site(config)`, the `LOADERS` entry of the formats dicom,
image and nifti, logs the skipped files and returns `SiteData`, or raises `SiteDataError`.

Bad files and rows (left out and reported with `on_bad_file: skip`; with `fail` any of them makes
the data unusable): a file the reader refuses (`BadImageFileError.problem` says why), a row whose
file does not exist, a label that is empty or not in `data.classes`, a second copy of an image
(same bytes or SOP Instance UID). Unusable whatever the policy: a missing folder or sheet, a
broken sheet, a patient in two splits, images of different sizes with `preprocess.size: []`, no
training or no test image.

Cache: decoded, preprocessed images are kept in `<state_dir>/cache/images` (MONAI's
PersistentDataset, one file per image) keyed by the file's path, size and modification time and
by `common.transforms.settings_key`. Site configs may share a state_dir: a scan lists the entries
its site config uses in `<state_dir>/cache/index/<key>.json` (key: the config's path and image
folder) and removes only entries no index lists; the index of a site config or image folder that
no longer exists goes too. No state_dir (or `data.cache: false`): no cache.

    python -c "from common.config import load_site; from common.sources import scan_site; print(scan_site(load_site('site.yaml')).summary())"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch
from monai.data import PersistentDataset
from monai.utils import convert_to_tensor

from common.files import write_atomic
from common.labels import LabelFileError, LabelRow, label_problem, read_labels_csv, split_rows
from common.readers import FORMATS, BadImageFileError, SiteImageReader, reader_for
from common.readers.masks import MaskError, read_mask
from common.schema import SiteConfig, SiteDataConfig
from common.sitedata import SiteData, SiteDataError
from common.source_report import BadFile, Sample, SourceReport, describe
from common.transforms import build_transforms, settings_key

log = logging.getLogger("fedward.site")

FOLDER_FORMATS = FORMATS  # dicom, image, nifti: a folder of files read by common.readers
CACHE_SUBDIR = Path("cache") / "images"
INDEX_SUBDIR = Path("cache") / "index"  # one JSON file per site config: the cache entries it uses


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
            log.warning("site '%s': %s: %s", report.site, describe(bad), bad.detail)
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
    """Where the site's decoded images are kept; None when it keeps none."""
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
    report = SourceReport(
        config.site, data.format, root, labels, list(data.classes), data.on_bad_file, colour=data.colour
    )
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

    if any(r.mask for r in rows) and data.preprocess.spatial != "resize":
        report.fatal.append("masks are resized with their images (nearest neighbour): they need "
                            "data.preprocess.spatial: resize")  # fmt: skip
        return report
    by_row, decoded = _find_and_read(config, report, rows, bad_rows)
    split_of = _splits(rows, data, report)
    keep = _take_samples(report, rows, by_row, decoded, split_of)
    line_of = {rel: rows[i].line for i, rel in by_row.items()}
    for bad in report.bad:  # a file that failed to decode: point at the row that names it
        bad.line = bad.line or line_of.get(bad.file)
    report.bad.sort(key=lambda b: (b.line or 0, b.file))
    _stack(report, [decoded[by_row[i]]["image"] for i in keep], data)
    _final_checks(report)
    report.seconds = time.perf_counter() - t0
    return report


def _read_rows(path: Path, data: SiteDataConfig, report: SourceReport) -> tuple[list[LabelRow], set[int]]:
    """The label sheet's rows, and the indices of rows left out. With on_bad_file: skip, a row
    whose label is empty or not in `classes` is reported and left out of training (it still
    takes part in the patient split, so correcting it later moves no other patient); with fail
    it raises LabelFileError."""
    classes = list(data.classes)
    rows = read_labels_csv(path, classes=classes, strict=data.on_bad_file == "fail")
    bad_rows = {i for i, row in enumerate(rows) if row.label_index < 0}
    for i in sorted(bad_rows):
        row = rows[i]
        problem, detail = label_problem(row, classes)
        report.bad.append(BadFile(row.file or row.sop_instance_uid or "?", problem, detail, row.line))
    return rows, bad_rows


def _find_and_read(
    config: SiteConfig, report: SourceReport, rows: list[LabelRow], bad_rows: set[int]
) -> tuple[dict[int, str], dict[str, dict]]:
    """Row index -> file, and file -> read sample, for every row whose file exists and reads;
    fills report.bad (files missing or unreadable) and report.unlabelled (files no row names)."""
    root, reader = report.root, reader_for(config.data)
    on_disk = _list_files(root, reader, exclude=report.labels)
    by_row, wanted = _files_for_rows(rows, root, bad_rows, report, folders=reader.takes_folders)
    uid_rows = [i for i, r in enumerate(rows) if r.file is None and i not in bad_rows]
    candidates = sorted(set(on_disk) - set(wanted)) if uid_rows else []
    decoded = _decode(config, root, sorted(set(wanted) | set(candidates)), report)

    by_uid: dict[str, str] = {}  # rows that name only a SOP Instance UID: find it among the others
    for rel in candidates:
        if rel in decoded and decoded[rel]["sop_instance_uid"]:
            by_uid.setdefault(decoded[rel]["sop_instance_uid"], rel)
    for i in uid_rows:
        uid = str(rows[i].sop_instance_uid)
        if uid in by_uid:
            by_row[i] = by_uid[uid]
        else:
            detail = f"no readable file in '{root}' has SOP Instance UID {uid}"
            report.bad.append(BadFile(uid, "file not found", detail, rows[i].line))

    used, bad_files = set(by_row.values()), {b.file for b in report.bad}
    report.unlabelled = [rel for rel in on_disk if rel not in used and rel not in bad_files]
    return by_row, decoded


def _list_files(root: Path, reader: SiteImageReader, *, exclude: Path) -> list[str]:
    """Files under `root` the site's reader takes (by suffix), relative, sorted; hidden files,
    DICOMDIR and the label sheet itself are left out. A reader of folders (DICOM series) takes
    every folder that holds files."""
    out = []
    skip = exclude.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if reader.takes_folders:
            if any(
                not n.startswith(".") and Path(dirpath, n).resolve() != skip for n in filenames
            ) and dirpath != str(root):
                out.append(Path(dirpath).relative_to(root).as_posix())
            continue
        for name in filenames:
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            p = Path(dirpath) / name
            if p.resolve() != skip and reader.verify_suffix(p):
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _files_for_rows(
    rows: list[LabelRow], root: Path, bad_rows: set[int], report: SourceReport, *, folders: bool = False
) -> tuple[dict[int, str], list[str]]:
    """Row index -> file (relative to root) for rows that name a file (with `folders`: a series
    folder) that exists; rows whose file is missing are reported and added to `bad_rows`."""
    by_row, wanted = {}, []
    for i, row in enumerate(rows):
        if row.file is None or i in bad_rows:
            continue
        path = root / row.file
        if not _inside(path, root):  # the service would read it with its own rights
            report.bad.append(BadFile(row.file, "outside the image folder", f"'{row.file}' is not under "
                                      f"data.root ({root}): name each file by its path under it", row.line))  # fmt: skip
            bad_rows.add(i)
            continue
        if not (path.is_dir() if folders else path.is_file()):
            what = "series folder" if folders else "file"
            report.bad.append(
                BadFile(row.file, "file not found", f"the {what} '{path}' does not exist", row.line)
            )
            bad_rows.add(i)
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        by_row[i] = rel
        wanted.append(rel)
    return by_row, wanted


def _take_samples(
    report: SourceReport, rows: list[LabelRow], by_row: dict[int, str], decoded: dict, split_of: list[str]
) -> list[int]:
    """Add a Sample per readable row, in sheet order; a second copy of an image (same bytes or
    SOP Instance UID) is reported instead. Returns the rows taken."""
    keep: list[int] = []
    seen_sha: dict[str, str] = {}
    seen_uid: dict[str, str] = {}
    for i in sorted(by_row, key=lambda i: rows[i].line):
        rel, row = by_row[i], rows[i]
        item = decoded.get(rel)
        if item is None:
            continue  # unreadable: already reported
        uid = item["sop_instance_uid"]
        first = seen_sha.get(item["sha1"]) or (uid and seen_uid.get(uid))
        if first:
            detail = f"the same image as '{first}' (same bytes or SOP Instance UID); remove one"
            report.bad.append(BadFile(rel, "duplicate", detail, row.line))
            continue
        if row.mask:  # a segmentation sheet: the mask beside the image, checked against it
            try:
                report.masks.append(_mask_for(report, row, item))
            except MaskError as err:
                report.bad.append(BadFile(rel, err.problem, f"mask '{row.mask}': {err.reason}", row.line))
                continue
        seen_sha[item["sha1"]] = rel
        if uid:
            seen_uid[uid] = rel
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
                colour_file=bool(item.get("colour_file", False)),
                sop_instance_uid=str(uid),
                file_patient_id=str(item["file_patient_id"]),
                sha1=str(item["sha1"]),
                acquisition=dict(item.get("acquisition") or {}),
            )
        )
    return keep


def _inside(path: Path, root: Path) -> bool:
    """Whether a label sheet's `path` (joined to `root`) stays under `root` as written: not through
    '..' out of it, not an absolute path elsewhere. Symbolic links are the site's own to make."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    return rel != os.curdir and rel != os.pardir and not rel.startswith(os.pardir + os.sep)


def _mask_for(report: SourceReport, row: LabelRow, item: dict) -> torch.Tensor:
    """The row's mask, read and checked against its image, at the image's preprocessed size (nearest)."""
    volume = len(item["image"].shape) == 4  # C x D x H x W
    shape = tuple(item["orig_size"]) if volume else tuple(item["orig_size"][:2])
    if not _inside(report.root / row.mask, report.root):
        raise MaskError(row.mask, f"not under data.root ({report.root}): name it by its path under it",
                        problem="outside the image folder")  # fmt: skip
    mask = read_mask(report.root / row.mask, shape=shape, patient_id=str(item["file_patient_id"]),
                     sop_instance_uid=str(item["sop_instance_uid"]), num_classes=len(report.classes),
                     slice_uids=tuple(item.get("slice_uids") or ()))  # fmt: skip
    # resampling to a spacing and resizing are both stretches of the grid: one nearest-neighbour resize
    # from the stored grid to the preprocessed one is their composition
    size = tuple(item["image"].shape[1:])
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest"
    )
    return resized[0, 0].long()


def _decode(config: SiteConfig, root: Path, files: list[str], report: SourceReport) -> dict[str, dict]:
    """Read and preprocess `files` (cached); unreadable ones go to report.bad. rel -> sample."""
    key = settings_key(config.data)
    items, present = [], []
    for rel in files:
        try:
            stamp = _stamp(root / rel)
        except OSError as err:  # gone since the folder was listed, or unreadable
            report.bad.append(BadFile(rel, "file not found", f"'{root / rel}' cannot be opened ({err})"))
            continue
        items.append({"image": str(root / rel), "stamp": stamp, "settings": key})
        present.append(rel)
    folder = cache_dir(config)
    ds = PersistentDataset(items, transform=build_transforms(config.data), cache_dir=folder)
    out, entries = {}, set()
    for i, rel in enumerate(present):
        hit = False
        if folder is not None:  # the name PersistentDataset gives the item's cache file
            cached = folder / f"{ds.hash_func(items[i]).decode('utf-8')}{ds.transform_hash}.pt"
            entries.add(cached.name)
            hit = cached.is_file()
        try:
            out[rel] = ds[i]
        except MemoryError:
            raise
        except Exception as exc:  # one bad file must not stop the site: report it
            report.bad.append(_unreadable(rel, root / rel, exc))
            continue
        report.from_cache += hit
        report.decoded += not hit
    if folder is not None and folder.is_dir():
        _update_cache(config, root, folder, entries)
    return out


def _stamp(path: Path) -> str:
    """What changes when a file (or a series folder's files) changes: sizes and modification times."""
    if path.is_dir():
        stats = [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
        return (
            f"{len(stats)}:{sum(s.st_size for s in stats)}:{max((s.st_mtime_ns for s in stats), default=0)}"
        )
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _unreadable(rel: str, path: Path, exc: BaseException) -> BadFile:
    """The report's line for a file whose reading raised `exc`. MONAI wraps a transform's error in
    RuntimeError('applying transform ...'): the reader's own error is among its causes."""
    err = exc
    while err.__cause__ is not None and not isinstance(err, BadImageFileError):
        err = err.__cause__
    if isinstance(err, BadImageFileError):
        return BadFile(rel, err.problem, str(err).removeprefix(f"{path}: "))
    if isinstance(err, FileNotFoundError):
        return BadFile(rel, "file not found", f"'{path}' disappeared while reading")
    return BadFile(rel, "corrupt", f"cannot be read ({type(err).__name__}: {err})")


def _update_cache(config: SiteConfig, root: Path, cache: Path, entries: set[str]) -> None:
    """Write this site config's index (keyed by its path and image folder): the cache files its
    scan used; then remove the cache files no index lists. The index of a site config or image
    folder that no longer exists goes first; one that cannot be read keeps nothing."""
    folder = Path(config.state_dir).expanduser() / INDEX_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    source = str(Path(config.source_path).expanduser().resolve()) if config.source_path else ""
    image_root = str(root.resolve())
    key = hashlib.sha256(json.dumps([source, image_root]).encode()).hexdigest()[:16]
    index = {"site": config.site, "site_config": source, "root": image_root, "entries": sorted(entries)}
    write_atomic(folder / f"{key}.json", json.dumps(index, indent=1))  # a scan meanwhile sees all or none

    needed: set[str] = set()
    for path in folder.glob("*.json"):
        try:
            index = json.loads(path.read_text())
            config_path, images, listed = index["site_config"], Path(index["root"]), set(index["entries"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (config_path and not Path(config_path).is_file()) or not images.is_dir():
            path.unlink(missing_ok=True)
        else:
            needed |= listed
    for old in cache.glob("*.pt"):
        if old.name not in needed:
            old.unlink(missing_ok=True)


def _splits(rows: list[LabelRow], data: SiteDataConfig, report: SourceReport) -> list[str]:
    """Each row's split, by patient. All rows count (bad ones too), so fixing a bad file or label
    later does not move any other patient. Patients the sheet puts in two splits are fatal."""
    fractions = tuple(float(f) for f in data.split_fractions)
    split_of, report.split_conflicts = split_rows(rows, seed=data.split_seed, fractions=fractions)  # type: ignore[arg-type]
    if report.split_conflicts:
        names = ", ".join(f"{p} ({'/'.join(s)})" for p, s in sorted(report.split_conflicts.items())[:5])
        report.fatal.append(
            f"{len(report.split_conflicts)} patient(s) have rows in more than one split in the sheet's "
            f"'split' column: {names}; one patient must stay in one split"
        )
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
                f"patients, or change 'data.split_fractions' or 'data.split_seed' (each patient's split "
                f"is its own draw), or put patients there with the sheet's split column"
            )
    mismatched = [s for s in report.samples if s.file_patient_id and s.file_patient_id != s.patient_id]
    if mismatched:
        s = mismatched[0]
        report.notes.append(
            f"{len(mismatched)} file(s) carry a Patient ID other than their row's patient_id (e.g. "
            f"{s.file}: file '{s.file_patient_id}', sheet '{s.patient_id}'); the sheet's is used for splits"
        )


__all__ = ["FOLDER_FORMATS", "BadFile", "Sample", "SourceReport", "load_folder_site", "scan_site"]
