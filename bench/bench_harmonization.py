"""Harmonization of acquisition: does re-rendering training images as other scanners might
(`train.acquisition_augment`), or standardizing each image's intensities (`data.normalize: zscore`),
help at a hospital that never took part? Measured where a new hospital's scanner shows:
leave-one-site-out, on fedward's synthetic sites (each its own scanner: gain, gamma, blur, noise;
common.scanners) or a MedMNIST set with `--dataset` (acquisition shift on).

    python bench/bench_harmonization.py [--seeds 3] [--rounds 5] [--dataset pneumoniamnist --data-dir D]

For each seed, `fedward study` (leave-one-out and the federation on all sites; no local or
centralized references) with each setting of SETTINGS, on the same sites and splits. Prints per
held-out site the AUC of the model federated without it, and the pooled AUC of the federation of all,
medians over the seeds, side by side.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from common.config import load_study  # noqa: E402
from server.run_folder import Variant  # noqa: E402
from server.study.run import run_comparison  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


SETTINGS = {  # name: (train.acquisition_augment, data.normalize)
    "none": (False, "none"),
    "augment": (True, "none"),
    "zscore": (False, "zscore"),
    "augment+zscore": (True, "zscore"),
}


def one(study, seed: int, setting: str, folder: Path) -> dict[str, float]:
    s = copy.deepcopy(study)
    s.seed, (s.train.acquisition_augment, s.data.normalize) = seed, SETTINGS[setting]
    s.study.local = s.study.centralized = False
    s.study.leave_one_out, s.study.bootstrap_samples = True, 200
    doc = run_comparison(s, folder / f"{seed}-{setting}", console=Console(quiet=True))
    rows = doc["comparison"]["rows"]
    out = {f"left out: {site}": rows[site][Variant.LEAVE_ONE_OUT]["auc"] for site in doc["sites"]}
    return out | {"federated, pooled": rows["pooled"][doc["primary"]]["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", default="", help="a MedMNIST set (default: the synthetic sites)")
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args()
    study = load_study(CONFIG, rounds=args.rounds)
    if args.dataset:
        study.data.source, study.data.dataset, study.data.data_dir = "medmnist", args.dataset, args.data_dir
        study.data.partition.acquisition_shift = True
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in SETTINGS:
                results[name].append(one(study, seed, name, Path(tmp)))
                print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    keys = list(results["none"][0])
    print(f"\nAUC, median of {args.seeds} seed(s), {args.dataset or 'synthetic'} sites, {args.rounds} rounds")
    print(f"{'':28s}" + "".join(f"{name:>16s}" for name in SETTINGS))
    for k in keys:
        cells = [statistics.median(r[k] for r in results[name]) for name in SETTINGS]
        print(f"{k:28s}" + "".join(f"{c:16.3f}" for c in cells))


if __name__ == "__main__":
    main()
