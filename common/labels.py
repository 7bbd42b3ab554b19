"""A site's label sheet (CSV) and the split of its rows into train / val / test by patient.

`read_labels_csv(path, classes=...)` reads the sheet into `LabelRow`s: columns `file` and/or
`sop_instance_uid` (the image), `patient_id`, `label`, optional `split`; any column order,
header names in any case, values stripped. A sheet that cannot be used raises `LabelFileError`
naming the file, line and column; with strict=False a row whose label is empty or unknown is kept
for the caller to report (`label_problem`). `patient_split(rows, seed=...)` keeps each patient in
one of `SPLITS`: the same rows and seed give the same split on every machine; `split_rows` gives
each row's split and the patients the sheet's `split` column puts in two. Nothing here imports flwr.

    python -c "from common.labels import read_labels_csv; print(read_labels_csv('labels.csv', classes=['normal', 'pneumonia'])[:3])"
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SPLITS",
    "LabelFileError",
    "LabelRow",
    "patient_split",
    "label_problem",
    "read_labels_csv",
    "split_rows",
]

PathLike = str | os.PathLike[str]
SPLITS = ("train", "val", "test")
_KEYS = ("file", "sop_instance_uid")  # the columns that name a row's image


class LabelFileError(ValueError):
    """A label sheet (CSV) with a missing column, an unknown label or no rows."""

    def __init__(
        self, path: PathLike, reason: str, *, line: int | None = None, column: str | None = None
    ) -> None:
        self.path = Path(path)
        self.reason = reason
        self.line = line
        self.column = column
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class LabelRow:
    """One row of a site's label sheet."""

    file: str | None  # path relative to the site's image folder, as written
    sop_instance_uid: str | None
    patient_id: str
    label: str
    label_index: int  # position of `label` in the study's classes; -1: not one (strict=False)
    split: str | None  # "train" / "val" / "test" when the site fixes it
    line: int  # line in the CSV, for messages
    mask: str = ""  # segmentation sheets: the mask file of the image (PNG, NIfTI or DICOM-SEG)


def read_labels_csv(path: PathLike, *, classes: list[str], strict: bool = True) -> list[LabelRow]:
    """Read a label sheet: columns `file` and/or `sop_instance_uid`, `patient_id`, `label`,
    optional `split`. Header names are matched case-insensitively; values are stripped.

    Raises LabelFileError naming the file, line and column for: an empty file or one with
    no rows, a missing column, an empty key or patient, a label not in `classes` (with
    strict=False such a row, or one with an empty label, is kept with label_index -1 for the
    caller to report), a split other than train/val/test, and the same image listed twice.
    """
    path = Path(path)
    allowed = list(classes)
    records = _records(csv.reader(io.StringIO(_text(path), newline="")), path)
    _, header = next(records, (1, []))
    columns, keys = _columns(header, path)
    rows: list[LabelRow] = []
    seen: dict[tuple[str, str], int] = {}  # (key column, value) -> first line
    for line, record in records:
        if not any(v.strip() for v in record):
            continue  # blank line
        if len(record) != len(columns):
            raise LabelFileError(path, f"has {len(record)} values, the header has {len(columns)}", line=line)
        values = {c: v.strip() for c, v in zip(columns, record, strict=True)}
        _check_keys(values, keys, seen, path, line)
        rows.append(_row(values, allowed, strict, path, line))
    if not rows:
        raise LabelFileError(path, "the file has a header but no rows", line=2)
    return rows


def _text(path: Path) -> str:
    """The sheet's text (UTF-8, with or without a byte order mark)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(
            path,
            f"not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r}); save the sheet as 'CSV UTF-8'",
            line=raw[: exc.start].count(b"\n") + 1,
        ) from exc


def _columns(header: list[str], path: Path) -> tuple[list[str], list[str]]:
    """The header's column names (lower case) and which of the image columns it has."""
    if not any(h.strip() for h in header):
        raise LabelFileError(
            path,
            "the file is empty: expected a header row with columns file (or "
            "sop_instance_uid), patient_id, label and optionally split",
            line=1,
        )
    columns = [h.strip().lower() for h in header]
    keys = [c for c in _KEYS if c in columns]
    if not keys:
        raise LabelFileError(
            path,
            f"no image column: add 'file' (path relative to the image folder) or "
            f"'sop_instance_uid' (header has {columns})",
            line=1,
            column="file",
        )
    for required in ("patient_id",) if "mask" in columns else ("patient_id", "label"):
        if required not in columns:
            raise LabelFileError(path, f"missing column (header has {columns})", line=1, column=required)
    return columns, keys


def _check_keys(
    values: dict[str, str], keys: list[str], seen: dict[tuple[str, str], int], path: Path, line: int
) -> None:
    """A row must name its image, and no image twice; `seen` collects the images named so far."""
    present = {k: values[k] for k in keys if values[k]}
    if not present:
        raise LabelFileError(path, "empty: every row needs the image it labels", line=line, column=keys[0])
    for key, value in present.items():
        if (key, value) in seen:
            raise LabelFileError(
                path,
                f"'{value}' is listed twice (first on line {seen[key, value]})",
                line=line,
                column=key,
            )
        seen[key, value] = line


def _row(values: dict[str, str], allowed: list[str], strict: bool, path: Path, line: int) -> LabelRow:
    """One record's patient, label and split, checked."""
    if not values["patient_id"]:
        raise LabelFileError(
            path, "empty: patient_id keeps a patient in one split", line=line, column="patient_id"
        )
    if "mask" in values:  # a segmentation sheet: the mask is the label
        if not values["mask"]:
            raise LabelFileError(path, "empty: every row of a sheet with masks names its mask file", line=line,
                                 column="mask")  # fmt: skip
        values = {**values, "label": allowed[0] if allowed else ""}
    label = values["label"]
    if label not in allowed and strict:
        raise LabelFileError(
            path,
            f"'{label}' is not one of the study's classes {allowed}; fix the label or "
            "add the class to the study config",
            line=line,
            column="label",
        )
    split = values.get("split", "").lower() or None
    if split is not None and split not in SPLITS:
        raise LabelFileError(
            path,
            f"'{values['split']}' is not a split; use one of {list(SPLITS)} or leave it empty",
            line=line,
            column="split",
        )
    return LabelRow(
        file=values.get("file") or None,
        sop_instance_uid=values.get("sop_instance_uid") or None,
        patient_id=values["patient_id"],
        label=label,
        label_index=allowed.index(label) if label in allowed else -1,
        split=split,
        line=line,
        mask=values.get("mask", ""),
    )


def label_problem(row: LabelRow, classes: list[str]) -> tuple[str, str]:
    """Why a row read with strict=False (label_index -1) cannot train: a short code and the detail."""
    if row.label:
        return (
            "unknown label",
            f"label '{row.label}' is not one of {classes}; fix the row or the site's classes",
        )
    return "missing label", "the row has no label; fix the row or the site's classes"


def _records(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, values) per CSV record, with the csv module's errors named by file and line."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise LabelFileError(path, f"not valid CSV ({exc})", line=reader.line_num) from exc
        yield reader.line_num, record


def patient_split(
    rows: Sequence[LabelRow],
    *,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> dict[str, list[int]]:
    """Split row indices into train/val/test by patient, so no patient is in two splits.

    Patients whose rows carry a `split` go there (all their rows must agree). Each other patient's
    split is drawn from a keyed hash of `seed` and its patient id alone, with `fractions` (train, val,
    test) as the chances: the same patient and seed give the same split on every machine, whatever
    else the sheet holds. So a patient added to or removed from the sheet moves no other patient
    between the splits (the per-patient privacy of training then holds for the hospital's sheet, not
    only for the training split it drew), and a patient stays in its split as the sheet grows (it
    cannot spend the training budget in one study and the evaluation budget in the next). A small
    site's splits are near the fractions, not exactly them.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions={fractions!r}: expected three non-negative numbers (train, val, test) that sum to 1"
        )
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_patient[row.patient_id].append(i)

    assigned: dict[str, str] = {}
    for patient, indices in by_patient.items():
        given = {rows[i].split for i in indices if rows[i].split}
        if len(given) > 1:
            lines = sorted(rows[i].line for i in indices)
            raise ValueError(
                f"patient '{patient}' has rows in splits {sorted(given)} (lines {lines}); "
                "one patient must stay in one split"
            )
        if given:
            assigned[patient] = given.pop()

    bounds = np.cumsum(fractions)
    for patient in by_patient:
        if patient not in assigned:
            chance = _uniform(seed, patient)
            assigned[patient] = SPLITS[
                min(int(np.searchsorted(bounds, chance, side="right")), len(SPLITS) - 1)
            ]

    split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for patient, indices in by_patient.items():
        split[assigned[patient]].extend(indices)
    return {name: sorted(indices) for name, indices in split.items()}


def _uniform(seed: int, patient: str) -> float:
    """A number in [0, 1) drawn from `seed` and `patient` alone (BLAKE2b keyed with the seed)."""
    key = int(seed).to_bytes(16, "little", signed=True)
    digest = hashlib.blake2b(patient.encode("utf-8"), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_rows(
    rows: Sequence[LabelRow], *, seed: int, fractions: tuple[float, float, float]
) -> tuple[list[str], dict[str, list[str]]]:
    """Each row's split (patient_split), and the patients whose rows the sheet's `split` column
    puts in more than one split (patient -> those splits). A conflicting patient's `split` values
    are ignored, so every row still gets a split; what a conflict means is the caller's call."""
    given: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split:
            given[row.patient_id].add(row.split)
    conflicts = {p: sorted(s) for p, s in given.items() if len(s) > 1}
    if conflicts:
        rows = [dataclasses.replace(r, split=None) if r.patient_id in conflicts else r for r in rows]
    split_of = [""] * len(rows)
    for split, indices in patient_split(rows, seed=seed, fractions=fractions).items():
        for i in indices:
            split_of[i] = split
    return split_of, conflicts
