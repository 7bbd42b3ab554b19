"""DICOM-to-tensor throughput of a site's data loading: the first epoch (every file decoded and
preprocessed, then cached) against a later one served from the cache, measured in one run.

    python bench/bench_dicom_cache.py [--files 200] [--size 512] [--input 128] [--syntax explicit|rle]

Writes a site of `--files` CT images (size x size, 12-bit, with rescale and window) with pydicom in
a temporary folder and loads it with `common.sources.scan_site`, exactly as a site does when it
starts: once without a cache (decode only), once with an empty cache (decode + write the cache:
the first epoch), then three times with the cache warm (later epochs and restarts). Prints images
per second for each and the ratio later / first; the target is >= 10x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.schema import SiteConfig, SiteDataConfig  # noqa: E402
from common.sources import scan_site  # noqa: E402

TARGET = 10.0


def write_site(folder: Path, n: int, size: int, syntax: str) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-((((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.35) ** 2) ** 2))
    lines = ["file,patient_id,label"]
    for i in range(n):
        hu = -1000 + 1040 * body + rng.normal(0, 20, (size, size))  # air around soft tissue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", f"P{i // 4:04d}"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelSpacing = [0.7, 0.7]
        ds.PixelData = np.clip(hu + 1024, 0, 4095).astype("<u2").tobytes()
        if syntax == "rle":
            ds.compress(RLELossless)
        ds.save_as(folder / f"ct{i:05d}.dcm", enforce_file_format=True)
        lines.append(f"ct{i:05d}.dcm,P{i // 4:04d},{'normal' if i % 2 else 'finding'}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def load(folder: Path, state: Path, size: int, cache: bool) -> tuple[float, object]:
    data = SiteDataConfig(
        format="dicom", root=str(folder), labels=str(folder / "labels.csv"), classes=["normal", "finding"]
    )
    data.preprocess.size, data.preprocess.normalize, data.cache = [size, size], "zscore", cache
    config = SiteConfig(site="bench", data=data, state_dir=str(state))
    t0 = time.perf_counter()
    report = scan_site(config)
    return time.perf_counter() - t0, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="stored image size (CT: 512)")
    parser.add_argument("--input", type=int, default=128, help="model input size after preprocessing")
    parser.add_argument("--syntax", choices=("explicit", "rle"), default="explicit")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        write_site(folder, args.files, args.size, args.syntax)
        state = Path(tmp) / "state"
        mb = sum(p.stat().st_size for p in folder.glob("*.dcm")) / 1e6
        print(
            f"{args.files} CT files {args.size}x{args.size} ({args.syntax}, {mb:.0f} MB) -> "
            f"{args.input}x{args.input} z-scored tensors"
        )
        no_cache, _ = load(folder, state, args.input, cache=False)
        first, r1 = load(folder, state, args.input, cache=True)
        later = []
        for _ in range(3):
            t, r = load(folder, state, args.input, cache=True)
            later.append(t)
        assert r1.decoded == args.files and r.from_cache == args.files and r.decoded == 0
        assert (r.images == r1.images).all()
        best = statistics.median(later)
        n = args.files

        def row(name: str, seconds: float) -> None:
            print(
                f"  {name:<34} {seconds:7.2f} s  {n / seconds:9.0f} images/s  {seconds / n * 1e3:7.2f} ms/image"
            )

        row("decode, no cache", no_cache)
        row("first epoch (decode + write cache)", first)
        row("later epoch (cache, median of 3)", best)
        ratio = first / best
        print(f"later epoch / decode without a cache: {no_cache / best:.1f}x")
        print(f"later epoch / first epoch speed-up: {ratio:.1f}x (target >= {TARGET:.0f}x) ", end="")
        print("OK" if ratio >= TARGET else "BELOW TARGET")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
