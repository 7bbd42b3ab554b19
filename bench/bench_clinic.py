"""The clinic's speed: `fedward predict` throughput, DICOM in to report out, and `fedward serve`'s latency
per image from C-STORE to the report stored in a real Orthanc.

    python bench/bench_clinic.py [--images 40]

Trains a cnn28 on fedward's synthetic images (a minute on 2 cores), packages it, writes `--images`
generated DICOM files (tests/common/test_sources.write_dicom: chest-like, 28x28), then in one run:
predict with heat-map PNGs, SR and Secondary Capture for each; predict without the PNGs; and serve: each image C-STOREd to a DicomNode whose results go to an Orthanc started on free
loopback ports, timed until that image's SR and Secondary Capture are in Orthanc (its REST API
polled every 20 ms).
Prints images per second, the latency's median and 95th percentile, and the heat maps' pointing-game
score on 200 synthetic positives against a random peak's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.dicom_node import DicomNode  # noqa: E402
from client.predict import predict  # noqa: E402
from common.synthetic import synthetic_images_with_findings  # noqa: E402
from server.processes import free_port  # noqa: E402
from tests.common.test_sources import with_study_header, write_dicom  # noqa: E402
from tests.packages import pointing_game, synthetic_package  # noqa: E402


def package(folder: Path) -> Path:
    return synthetic_package(folder, images=800, epochs=10, lr=0.002)


def dicom_inputs(folder: Path, n: int) -> list[Path]:
    x, _, _ = synthetic_images_with_findings(n, 0.5, 28, np.random.default_rng(1))
    paths = [folder / f"img{i:03d}.dcm" for i in range(n)]
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for path, img in zip(paths, x, strict=True):
        write_dicom(path, img, patient_id="BENCH")
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series  # one study, as a PACS holds it
        with_study_header(ds, patient_name="BENCH^PATIENT", accession="A1").Manufacturer = "fedward-bench"
        ds.save_as(path)
    return paths


def orthanc(folder: Path, node_port: int) -> tuple[subprocess.Popen, str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
              "Plugins": [], "DicomModalities": {"fedward": ["FEDWARD", "127.0.0.1", node_port]}}  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(folder / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{http}"
    for _ in range(150):
        try:
            urllib.request.urlopen(base + "/system", timeout=2).read()
            return proc, base, dicom
        except OSError:
            time.sleep(0.2)
    raise SystemExit("Orthanc did not start (apt-get install orthanc)")


def serve_latencies(pkg: Path, paths: list[Path], folder: Path) -> list[float]:
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    node_port = free_port()
    proc, base, dicom_port = orthanc(folder, node_port)
    node = DicomNode(pkg, ae_title="FEDWARD", port=node_port, pacs=("127.0.0.1", dicom_port, "ORTHANC"),
                     undelivered=folder / "undelivered")  # fmt: skip
    node.start()
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(ComputedRadiographyImageStorage)
    latencies = []
    try:
        for i, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            assoc = sender.associate("127.0.0.1", node_port, ae_title="FEDWARD")
            t0 = time.perf_counter()
            assoc.send_c_store(ds)
            assoc.release()
            while len(json.loads(urllib.request.urlopen(base + "/instances").read())) < 2 * (i + 1):
                time.sleep(0.02)
            latencies.append(time.perf_counter() - t0)
    finally:
        node.stop()
        proc.terminate()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedward-bench-clinic-"))
    pkg = package(folder)
    paths = dicom_inputs(folder / "in", args.images)
    rates = {}
    for name, heat in (
        ("predict: heat map PNG + SR + Secondary Capture", True),
        ("predict: SR + Secondary Capture", False),
    ):
        t0 = time.perf_counter()
        predict(pkg, folder / "in", folder / f"out-{heat}", heatmaps=heat)
        rates[name] = args.images / (time.perf_counter() - t0)
    latencies = serve_latencies(pkg, paths, folder / "orthanc")
    score, baseline = pointing_game(pkg, images=200, seed=5)
    print(f"\n== {args.images} generated 28x28 DICOM images, cnn28, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"  {name:<45} {rate:7.1f} images/s")
    p95 = float(np.percentile(latencies, 95))
    print(
        f"  serve: C-STORE -> SR + heat map stored in Orthanc   median {statistics.median(latencies) * 1000:.0f} ms, 95th percentile {p95 * 1000:.0f} ms"
    )
    print(
        f"  pointing game on 200 synthetic positives: heat-map peak {score:.2f}, random peak {baseline:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
