"""Accuracy and Flower's overhead for the shipped PneumoniaMNIST study, measured in one run.

    python bench/bench_fedavg.py --data-dir ../shared/data [--config configs/pneumoniamnist.yaml]

Prints the final pooled and per-site test AUC beside the published centralized ResNet-18 (28) figure
(0.944, MedMNIST v2), the study's wall time against the 10-minute target, and per round the wall time
against the sites' own work: Flower's share = (round wall - sum of site training - sum of site
evaluation) / round wall, whose median after round 1 should be <= 5%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_study  # noqa: E402
from server.simulate import simulate  # noqa: E402

PUBLISHED_AUC = {"pneumoniamnist": 0.944, "breastmnist": 0.901}  # ResNet-18 (28), MedMNIST v2 Table 3


def overhead_rows(results: dict) -> list[dict]:
    rows = []
    timing = results["timing"]
    for i, record in enumerate(results["rounds"]):
        train = sum(v[i] or 0.0 for v in timing["train_s"].values())
        evals = sum(v[i] or 0.0 for v in timing["eval_s"].values())
        wall = timing["round_s"][i]
        rows.append(
            {
                "round": record["round"],
                "wall": wall,
                "train": train,
                "eval": evals,
                "flower_share": (wall - train - evals) / wall,
                "train_share": train / wall,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pneumoniamnist.yaml")
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    study = load_study(args.config, rounds=args.rounds, data_dir=args.data_dir)
    out = args.out or tempfile.mkdtemp(prefix="fedward-bench-")
    t0 = time.perf_counter()
    results = simulate(study, out)
    wall = time.perf_counter() - t0

    final = results["final"]
    reference = PUBLISHED_AUC.get(study.data.dataset)
    print(
        f"\n== accuracy: {study.name}, {len(final['sites'])} sites, {study.data.partition.scheme}"
        f" (alpha {study.data.partition.alpha}), {study.rounds} rounds, {study.model.name}"
    )
    for site, m in final["sites"].items():
        print(
            f"  {site:<14} n_test {m['n_test']:>4}  AUC {m['auc'] if m['auc'] is None else round(m['auc'], 4)}"
        )
    pooled = final["pooled"]["auc"]
    print(f"  {'pooled':<14} n_test {final['pooled']['n_test']:>4}  AUC {pooled:.4f}   (target >= 0.96)")
    if reference:
        print(
            f"  published centralized ResNet-18 (28): AUC {reference:.3f};  pooled / published = {pooled / reference:.3f}"
        )
    print(f"  wall time {wall:.0f} s for the whole study (target <= 600 s on 2 CPU cores)")

    rows = overhead_rows(results)
    print("\n== overhead per round: wall vs the sites' own work (seconds)")
    print("  round   wall  train   eval  flower share")
    for r in rows:
        print(
            f"  {r['round']:>5} {r['wall']:6.2f} {r['train']:6.2f} {r['eval']:6.2f}  {100 * r['flower_share']:6.1f} %"
        )
    later = [r["flower_share"] for r in rows[1:]] or [r["flower_share"] for r in rows]
    print(f"  median Flower share after round 1: {100 * statistics.median(later):.1f} % (target <= 5 %)")
    print(
        f"  median training share of a round:  {100 * statistics.median(r['train_share'] for r in rows[1:] or rows):.1f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
