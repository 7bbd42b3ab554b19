"""Tests for common/labels.py: label sheets (columns, labels, splits, the ways a sheet is wrong)
and the split by patient.

    pytest tests/common/test_labels.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.labels import LabelFileError, LabelRow, label_problem, patient_split, read_labels_csv, split_rows

CLASSES = ["normal", "pneumonia"]


def write_csv(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "labels.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_labels_csv_reads_rows_and_class_indices(tmp_path):
    path = write_csv(
        tmp_path,
        "File,Patient_ID,Label,Split\na/1.dcm,P1,normal,train\n\n a/2.dcm , P1 , pneumonia ,\n",
    )

    rows = read_labels_csv(path, classes=CLASSES)

    assert [(r.file, r.patient_id, r.label_index, r.split, r.line) for r in rows] == [
        ("a/1.dcm", "P1", 0, "train", 2),
        ("a/2.dcm", "P1", 1, None, 4),
    ]


def test_labels_csv_missing_column_names_it(tmp_path):
    path = write_csv(tmp_path, "file,label\na.dcm,normal\n")

    with pytest.raises(LabelFileError) as caught:
        read_labels_csv(path, classes=CLASSES)

    assert (caught.value.line, caught.value.column) == (1, "patient_id")
    assert "labels.csv, line 1, column 'patient_id'" in str(caught.value)


def test_labels_csv_unknown_label_lists_the_allowed_ones(tmp_path):
    path = write_csv(tmp_path, "sop_instance_uid,patient_id,label\n1.2.3,P1,normal\n1.2.4,P2,covid\n")

    with pytest.raises(LabelFileError) as caught:
        read_labels_csv(path, classes=CLASSES)

    assert (caught.value.line, caught.value.column) == (3, "label")
    assert "'covid'" in str(caught.value) and "['normal', 'pneumonia']" in str(caught.value)


def test_labels_csv_not_strict_keeps_rows_with_unknown_or_empty_labels(tmp_path):
    path = write_csv(tmp_path, "file,patient_id,label\na.dcm,P1,normal\nb.dcm,P2,covid\nc.dcm,P3,\n")

    rows = read_labels_csv(path, classes=CLASSES, strict=False)

    assert [r.label_index for r in rows] == [0, -1, -1]
    assert label_problem(rows[1], CLASSES)[0] == "unknown label"
    assert label_problem(rows[2], CLASSES)[0] == "missing label"
    with pytest.raises(LabelFileError, match="'covid'"):
        read_labels_csv(path, classes=CLASSES)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("file,patient_id,label\n", "no rows"),
        ("file,patient_id,label\na.dcm,P1,normal\na.dcm,P2,normal\n", "listed twice"),
        ("file,patient_id,label,split\na.dcm,P1,normal,holdout\n", "not a split"),
        ("file,patient_id,label\na.dcm,Ren\xe9e,normal\n".encode("cp1252"), "line 2.*UTF-8"),
        ('file,patient_id,label\na.dcm,"P1,normal\n', "2 values, the header has 3"),
    ],
)
def test_labels_csv_rejects_bad_sheets(tmp_path, text, match):
    path = write_csv(tmp_path, text)

    with pytest.raises(LabelFileError, match=match) as caught:
        read_labels_csv(path, classes=CLASSES)

    assert caught.value.path == path


def make_rows(n_patients: int, seed: int = 0) -> list[LabelRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 4))):
            rows.append(LabelRow(f"p{p}/{k}.dcm", None, f"P{p:03d}", "normal", 0, None, 0))
    return rows


def patients_by_split(split: dict[str, list[int]], rows: list[LabelRow]) -> dict[str, set]:
    return {name: {rows[i].patient_id for i in idx} for name, idx in split.items()}


def test_patient_split_keeps_each_patient_in_one_split_and_is_deterministic():
    rows = make_rows(40)

    split = patient_split(rows, seed=7)
    again = patient_split(rows, seed=7)
    reordered = patient_split(rows[::-1], seed=7)
    other = patient_split(rows, seed=8)

    patients = patients_by_split(split, rows)
    assert sorted(sum(split.values(), [])) == list(range(len(rows)))
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert not patients["val"] & patients["test"]
    assert split == again and split != other
    assert patients_by_split(reordered, rows[::-1]) == patients  # row order does not matter


def test_a_patients_split_does_not_depend_on_the_other_patients_in_the_sheet():
    """DP-SGD's per-patient guarantee is for the training set; it holds for the hospital's sheet only
    if adding or removing one patient changes the training set by that patient alone. When the split
    was a shuffle of the whole patient list cut by count, removing one of 40 patients moved 8 others
    between the splits (an independent review found it), and a growing sheet moved training patients
    into the test split, where they spend the evaluation budget too."""
    rows = make_rows(400)
    split = patients_by_split(patient_split(rows, seed=3), rows)
    without = [r for r in rows if r.patient_id != "P007"]
    grown = rows + [LabelRow(f"new{p}.dcm", None, f"N{p:03d}", "normal", 0, None, 0) for p in range(50)]

    for changed in (without, grown):
        again = patients_by_split(patient_split(changed, seed=3), changed)
        for name in ("train", "val", "test"):
            assert again[name] - split[name] <= {f"N{p:03d}" for p in range(50)}  # only the new ones joined
            assert split[name] - again[name] <= {"P007"}  # only the removed one left
    shares = [len(split[name]) / 400 for name in ("train", "val", "test")]
    assert abs(shares[0] - 0.7) < 0.07 and abs(shares[1] - 0.15) < 0.05 and abs(shares[2] - 0.15) < 0.05


def test_patient_split_respects_the_sites_split_column():
    rows = make_rows(20)
    fixed = {"P000": "test", "P001": "train"}
    rows = [LabelRow(r.file, None, r.patient_id, r.label, 0, fixed.get(r.patient_id), 0) for r in rows]

    split = patient_split(rows, seed=0, fractions=(1.0, 0.0, 0.0))

    assert {rows[i].patient_id for i in split["test"]} == {"P000"}
    assert split["val"] == []
    assert len(split["train"]) == len(rows) - len(split["test"])


def test_patient_split_rejects_a_patient_in_two_site_splits():
    rows = [
        LabelRow("a.dcm", None, "P1", "normal", 0, "train", 2),
        LabelRow("b.dcm", None, "P1", "normal", 0, "test", 3),
    ]

    with pytest.raises(ValueError, match=r"patient 'P1'.*lines \[2, 3\]"):
        patient_split(rows, seed=0)


def test_split_rows_reports_a_patient_in_two_splits_and_still_splits_every_row():
    rows = [
        LabelRow("a.dcm", None, "P1", "normal", 0, "train", 2),
        LabelRow("b.dcm", None, "P1", "normal", 0, "test", 3),
        LabelRow("c.dcm", None, "P2", "normal", 0, "test", 4),
    ]

    split_of, conflicts = split_rows(rows, seed=0, fractions=(1.0, 0.0, 0.0))

    assert conflicts == {"P1": ["test", "train"]}
    assert split_of == ["train", "train", "test"]  # P1 drawn (all train here), P2 as the sheet says
