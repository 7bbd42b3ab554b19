"""Privacy's cost in accuracy: the DP study beside the same study without privacy, in one run.

    python bench/bench_privacy.py --data-dir ../shared/data [--config configs/pneumoniamnist-dp.yaml] [--repeats 3]

Runs the config as it is (privacy on) `--repeats` times and once with `privacy.enabled: false`
(everything else the same: sites, splits, model, rounds), and prints pooled and per-site test AUC with
each site's final epsilon, and the median of the private runs: a site's noise comes from the OS's
entropy (client.randomness), so private runs no longer repeat and one run's AUC is one draw. Target
for PneumoniaMNIST: pooled AUC >= 0.93 at epsilon <= 8 (published non-private centralized ResNet-18
(28): 0.944).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_study  # noqa: E402
from server.simulate import simulate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pneumoniamnist-dp.yaml")
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--repeats", type=int, default=3, help="private runs (their median is reported)")
    args = parser.parse_args()

    private = load_study(args.config, rounds=args.rounds, data_dir=args.data_dir)
    plain = copy.deepcopy(private)
    plain.privacy.enabled = False
    rows = {}
    runs = [("no privacy", plain)] + [(f"DP run {i + 1}", private) for i in range(args.repeats)]
    for label, study in runs:
        t0 = time.perf_counter()
        rows[label] = (simulate(study, tempfile.mkdtemp(prefix="fedward-bench-")), time.perf_counter() - t0)

    print(
        f"\n== {private.name}: {private.rounds} rounds, {private.model.name}, "
        f"target epsilon {private.privacy.target_epsilon} at delta {private.privacy.delta}"
    )
    sites = list(rows["DP run 1"][0]["final"]["sites"])
    print(
        f"  {'run':<12} {'pooled AUC':>10}  "
        + "  ".join(f"{s + ' AUC':>16} {'eps':>5}" for s in sites)
        + "   wall s"
    )
    for label, (results, wall) in rows.items():
        final = results["final"]
        cells = []
        for s in sites:
            m = final["sites"][s]
            eps = m.get("epsilon")
            auc = "-" if m["auc"] is None else f"{m['auc']:.4f}"
            cells.append(f"{auc:>16} {'-' if eps is None else f'{eps:.2f}':>5}")
        print(f"  {label:<12} {final['pooled']['auc']:>10.4f}  " + "  ".join(cells) + f"   {wall:6.0f}")
    private_runs = [r for label, (r, _) in rows.items() if label.startswith("DP")]
    dp_auc = statistics.median(r["final"]["pooled"]["auc"] for r in private_runs)
    plain_auc = rows["no privacy"][0]["final"]["pooled"]["auc"]
    worst = max(m["epsilon"] for r in private_runs for m in r["final"]["sites"].values())
    print(
        f"  median pooled AUC with DP ({len(private_runs)} runs) {dp_auc:.4f}; with DP / without: "
        f"{dp_auc / plain_auc:.3f};  largest site epsilon {worst:.2f} (target: pooled AUC >= 0.93 at epsilon <= 8)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
