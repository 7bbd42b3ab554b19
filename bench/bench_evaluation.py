"""Protected evaluation's cost in accuracy: pooled AUC from noised releases beside the exact pooled AUC.

    python bench/bench_evaluation.py --data-dir ../shared/data [--config configs/pneumoniamnist.yaml] [--rounds N]

Trains the study once (`fedward simulate`), then, in the same run, evaluates its final model at every
site both ways: the exact pooled AUC over all sites' test images, and the pooled AUC the coordinator
computes from what each site releases under a `dp_histogram` evaluation policy (client.evaluation),
for several bin counts and noise levels, over many draws of the noise. Prints, per setting, the
median and 95th percentile of |pooled AUC from releases - exact|, the noise standard deviation the
coordinator states (server.releases), and the epsilon of one release and of a study's worth of them
(rounds + 1 evaluations) at delta 1e-5. Target: within 0.005 of the exact pooled AUC.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.evaluation import release, sensitivity  # noqa: E402
from client.randomness import RoundRandomness  # noqa: E402
from client.train import predict  # noqa: E402
from common.config import load_study  # noqa: E402
from common.data import load_site_data  # noqa: E402
from common.metrics import exact_auc  # noqa: E402
from common.models import load_model  # noqa: E402
from common.privacy import rdp_epsilon  # noqa: E402
from common.schema import EvaluationPolicyConfig  # noqa: E402
from common.simulated import simulated_sites  # noqa: E402
from server.releases import pooled_metrics, site_release  # noqa: E402
from server.run_folder import FINAL_MODEL_FILE  # noqa: E402
from server.simulate import simulate  # noqa: E402

SETTINGS = [(bins, noise) for bins in (8, 16, 32) for noise in (0.5, 1.0, 2.0, 4.0)]
DRAWS = 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pneumoniamnist.yaml")
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    study = load_study(args.config, rounds=args.rounds, data_dir=args.data_dir)
    out = Path(tempfile.mkdtemp(prefix="fedward-bench-eval-"))
    t0 = time.perf_counter()
    simulate(study, out)
    train_s = time.perf_counter() - t0
    model, _ = load_model(out / FINAL_MODEL_FILE)
    tests = {s.site: load_site_data(s) for s in simulated_sites(study)}
    preds = {name: (d.test_y.numpy(), predict(model, d.test_x)) for name, d in tests.items()}
    labels = np.concatenate([y for y, _ in preds.values()])
    exact = exact_auc(labels, np.concatenate([p for _, p in preds.values()]))
    n_classes = next(iter(preds.values()))[1].shape[1]
    print(
        f"\n== {study.name}: {len(preds)} sites, {len(labels)} test images, {study.rounds} rounds "
        f"(trained in {train_s:.0f} s); exact pooled AUC {exact:.4f}"
    )
    print("  bins  noise   |err| median   |err| 95%   stated sd   eps/release   eps for rounds+1 releases")
    for bins, noise in SETTINGS:
        policy = EvaluationPolicyConfig(bins=bins, noise=noise)
        errors, stated = [], []
        for _ in range(DRAWS):
            releases = {}
            for name, (y, p) in preds.items():
                out_ = release(y, p, policy, RoundRandomness.secret().noise)
                releases[name] = site_release(out_.kind, out_.metrics, n_classes)
            pooled = pooled_metrics(releases)
            errors.append(abs(pooled["auc"] - exact))
            stated.append(pooled["noise_sd"]["auc"])
        one = rdp_epsilon([(noise, 1.0, 1)], delta=1e-5)
        study_eps = rdp_epsilon([(noise, 1.0, 1)] * (study.rounds + 1), delta=1e-5)
        print(
            f"  {bins:>4}  {noise:>5}   {statistics.median(errors):12.4f}   {np.quantile(errors, 0.95):9.4f}"
            f"   {statistics.median(stated):9.4f}   {one:11.2f}   {study_eps:10.2f}"
        )
    print(
        f"  sensitivity per release: {sensitivity(n_classes):g} (one test image moves one count); target "
        "|err| <= 0.005"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
