"""`fedward site check` (client/check.py) on generated DICOM sites: the table, the problems, the
exit status.

    pytest tests/client/test_site_check.py -q
"""

from __future__ import annotations

import csv

import pytest

from client.check import check_site, main
from common.config import load_site
from common.data import load_site_data
from common.sources import scan_site
from tests.common.test_sources import BAD, write_dicom_site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_dicom_site(tmp_path_factory.mktemp("check"))


def test_a_usable_site_with_bad_files_lists_each_and_exits_0(site, capsys):
    (site.parent / "export" / "A000" / "extra.dcm").write_bytes(
        (site.parent / "export" / "A000" / "img1.dcm").read_bytes()
    )
    code = main([str(site)])
    out = capsys.readouterr().out
    assert code == 0
    assert "images per label and split" in out and "patients" in out
    for name, problem in BAD.items():
        line = next(line for line in out.splitlines() if name in line)
        assert problem in line, line
    assert "A000/extra.dcm" in out and "no label row" in out
    assert "CR (24), CT (1)" in out  # modalities
    assert "32x32 (24), 128x128 (1)" in out  # stored sizes
    assert "0.2 x 0.2 mm (24)" in out  # pixel spacing
    assert "1 x 32 x 32" in out  # the model input
    assert "usable" in out and "NOT usable" not in out
    jpegls = "real_mr_jpegls.dcm" in {b.file for b in scan_site(load_site(site)).bad}  # no plugin here
    assert f"skipped: {len(BAD) + jpegls} file(s) or row(s)" in out


def test_the_check_counts_what_training_gets_and_warms_the_cache(site):
    config = load_site(site)
    check = check_site(config)
    data = load_site_data(config)
    assert sum(check.counts["train"]) == len(data.train_y)
    assert sum(check.counts["test"]) == len(data.test_y)
    assert check.counts["train"] == [int((data.train_y == k).sum()) for k in (0, 1)]
    assert check.patients["all"] == len({s.patient_id for s in check.report.samples})
    again = scan_site(config)
    assert again.decoded == 0 and again.from_cache >= len(check.report.samples)


def test_fail_policy_exits_1_and_says_why(tmp_path, capsys):
    path = write_dicom_site(tmp_path, patients=8, data={"on_bad_file": "fail"})
    labels = tmp_path / "labels.csv"
    labels.write_text(labels.read_text().replace(",covid", ",normal"))
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "NOT usable" in out and "'data.on_bad_file' is 'fail'" in out
    assert "bad/truncated.dcm" in out


def test_a_patient_in_two_splits_exits_1(tmp_path, capsys):
    path = write_dicom_site(tmp_path, patients=6, bad_files=False)
    labels = tmp_path / "labels.csv"
    rows = list(csv.reader(labels.open()))
    splits = ["split"] + ["train"] * (len(rows) - 1)
    splits[2] = "test"  # A000's second image
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([[*r, s] for r, s in zip(rows, splits, strict=True)])
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "patient A000" in out and "in two splits" in out and "NOT usable" in out


def test_a_wrong_site_config_exits_2(tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_text("site: a\ndata: {format: dicom, root: r, labels: l.csv, classes: [a, b], window: [40]}\n")
    assert main([str(path)]) == 2
    assert "'data.window'" in capsys.readouterr().out


def test_a_synthetic_site_is_checked_through_the_same_command(tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_text(
        "site: s\ndata: {format: synthetic, synthetic: {train_per_site: 20, test_per_site: 10}}\n"
    )
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "normal" in out and "finding" in out and "1 x 28 x 28" in out
