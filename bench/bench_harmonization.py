"""Harmonization of acquisition: does re-rendering training images as other scanners might
(`train.acquisition_augment`), or standardizing each image's intensities (`data.normalize: zscore`),
help at a hospital that never took part? Measured where a new hospital's scanner shows:
leave-one-site-out, on fedward's synthetic sites (each its own scanner: gain, gamma, blur, noise;
common.scanners) or a MedMNIST set with `--dataset` (acquisition shift on).

    python bench/bench_harmonization.py [--seeds 3] [--rounds N] [--settings none augment ...]
        [--config configs/demo.yaml] [--dataset breastmnist --data-dir D] [--out OUT]

`--config` is the study to start from (default configs/demo.yaml, 5 rounds); `--dataset` switches it to
a MedMNIST set with acquisition shift on (a config that is already MedMNIST keeps its rounds, model
and training). For each seed, `fedward study` (leave-one-out and the federation on all sites; no
local or centralized references) with each setting of SETTINGS (or those `--settings` names), on the
same sites and splits. Prints per
held-out site the AUC of the model federated without it, and the pooled AUC of the federation of all,
medians over the seeds, side by side.
"""

from __future__ import annotations

import argparse
import copy
import os
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
    parser.add_argument("--rounds", type=int, help="default: the config's")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--dataset", default="", help="a MedMNIST set (default: the config's data)")
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--out", help="keep each study in OUT/<seed>-<setting> (default: a temporary folder)")
    args = parser.parse_args()
    study = load_study(args.config, rounds=args.rounds, data_dir=args.data_dir)
    if args.dataset:
        study.data.source, study.data.dataset = "medmnist", args.dataset
    if study.data.source == "medmnist":
        study.data.partition.acquisition_shift = True
        # as bench_study: every site's test data holds >= 10 images of each class, or a held-out
        # site's AUC rests on a handful of images (BreastMNIST's label skew leaves sites 9 test images)
        study.data.partition.min_test_per_class = 10
    results: dict[str, list[dict]] = {name: [] for name in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for seed in range(args.seeds):
            for name in args.settings:
                results[name].append(one(study, seed, name, out))
                print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    keys = list(results[args.settings[0]][0])
    where = study.data.dataset if study.data.source == "medmnist" else study.data.source
    print(f"\nAUC, median of {args.seeds} seed(s), {where} sites, {study.rounds} rounds, {study.model.name}")
    print(f"{'':28s}" + "".join(f"{name:>16s}" for name in args.settings))
    for k in keys:
        cells = [statistics.median(r[k] for r in results[name]) for name in args.settings]
        print(f"{k:28s}" + "".join(f"{c:16.3f}" for c in cells))


if __name__ == "__main__":
    main()
