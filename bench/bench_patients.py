"""Patient-level DP against image-level DP at the same epsilon: test AUC and the time of a DP step.

    python bench/bench_patients.py [--patients 150] [--per-patient 3] [--rounds 5]

Generates two hospitals' DICOM exports as the tests do (tests/common/test_sources.py: labelled chest-like
images, `--per-patient` images per patient), then, in one run, trains the same private study twice
through `fedward simulate`: the sites' policies with `privacy.unit: patient` (one clipped gradient per
patient, patients Poisson-sampled, the batch size in patients) and with `privacy.unit: image` (one
per image), both at target epsilon 8. Prints each run's pooled test AUC (exact, from its final model
on every test image) and epsilon, and the median time of one DP step of each kind on the same data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.dp import PoissonPlan  # noqa: E402
from client.patients import patient_groups  # noqa: E402
from client.randomness import RoundRandomness  # noqa: E402
from client.train import DPSettings, predict, train_round  # noqa: E402
from common.config import load_site, load_study  # noqa: E402
from common.data import load_site_data  # noqa: E402
from common.metrics import exact_auc  # noqa: E402
from common.models import build_model, load_model  # noqa: E402
from common.privacy import PrivacyRequest  # noqa: E402
from server.run_folder import FINAL_MODEL_FILE  # noqa: E402
from server.simulate import simulate  # noqa: E402
from tests.common.test_sources import write_dicom_site  # noqa: E402
from tests.plans import plan  # noqa: E402

CONTRAST = 0.04  # the finding's brightness against noise sd 0.03: hard enough that AUC is not 1.0


def sites(folder: Path, patients: int, per_patient: int, unit: str) -> list[Path]:
    paths = []
    for i, name in enumerate(("hospital-a", "hospital-b")):
        path = write_dicom_site(folder / name, name=name, patients=patients, per_patient=per_patient, size=28,
                                bad_files=False, seed=i, privacy={"unit": unit, "max_epsilon": 20},
                                contrast=CONTRAST)  # fmt: skip
        config = yaml.safe_load(path.read_text())
        config["state_dir"] = str(folder / name / f"state-{unit}")
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    return paths


def run(folder: Path, unit: str, rounds: int, args) -> tuple[float, dict]:
    paths = sites(folder / unit, args.patients, args.per_patient, unit)
    study_file = folder / f"study-{unit}.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": f"patients-{unit}", "rounds": rounds, "min_sites": 2,
        "classes": ["normal", "pneumonia"], "data": {"source": "sites", "site_configs": [str(p) for p in paths]},
        "model": {"name": "cnn28"}, "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.002},
        "privacy": {"enabled": True, "target_epsilon": 8.0},
    }))  # fmt: skip
    results = simulate(load_study(study_file), folder / f"run-{unit}")
    model, _ = load_model(folder / f"run-{unit}" / FINAL_MODEL_FILE)
    data = [load_site_data(load_site(p)) for p in paths]
    y = np.concatenate([d.test_y.numpy() for d in data])
    probs = np.concatenate([predict(model, d.test_x) for d in data])
    return exact_auc(y, probs), results


def step_times(folder: Path, args, steps: int = 30) -> dict[str, float]:
    data = load_site_data(load_site(sites(folder / "timing", args.patients, args.per_patient, "patient")[0]))
    groups = patient_groups(data.train_patients)
    out = {}
    for unit, n in (("image", len(data.train_y)), ("patient", len(groups))):
        batches = max(1, n // 16)
        request = PrivacyRequest(
            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode="hooks"
        )
        round_plan = plan(model="cnn28", batch_size=16, dp_enabled=True)
        times = []
        for _ in range(max(1, steps // batches)):
            model = build_model("cnn28")
            dp = DPSettings(
                request,
                poisson=PoissonPlan(1 / batches, n / batches),
                patients=groups if unit == "patient" else None,
            )
            t0 = time.perf_counter()
            result = train_round(
                model, data.train_x, data.train_y, round_plan, randomness=RoundRandomness.secret(), dp=dp
            )
            times.append((time.perf_counter() - t0) / max(result.steps, 1))
        out[unit] = statistics.median(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--per-patient", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = Path(tempfile.mkdtemp(prefix="fedward-bench-patients-"))
    rows = {unit: run(folder, unit, args.rounds, args) for unit in ("patient", "image")}
    times = step_times(folder, args)
    print(
        f"\n== two DICOM sites x {args.patients} patients x {args.per_patient} images, cnn28, {args.rounds} rounds, target epsilon 8"
    )
    print("  unit of privacy   pooled test AUC   epsilon per site (its unit)   DP step (batch of 16 units)")
    for unit, (auc, results) in rows.items():
        eps = ", ".join(f"{m['epsilon']:.2f}" for m in results["final"]["sites"].values())
        print(f"  {unit:<16}  {auc:15.4f}   {eps:>27}   {times[unit] * 1000:10.1f} ms")
    print(
        f"  patient-level step / image-level step: {times['patient'] / times['image']:.2f}x (a patient's batch holds {args.per_patient}x the images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
