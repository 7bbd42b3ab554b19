"""Per-round time of the PneumoniaMNIST study's site work on a GPU beside the same machine's CPU.

    python bench/bench_gpu.py --data-dir ../shared/data [--rounds 3] [--dp]

For each device it runs R FedAvg rounds of the shipped study (configs/pneumoniamnist.yaml, or
pneumoniamnist-dp.yaml with --dp) through each site's own code path without Flower: every site's
`SiteRuntime.train` (the ClientApp's handler minus the Message conversion: the round's plan, the
privacy guard and ledger with --dp, `client.train.train_round`) and `SiteRuntime.evaluate`; the
weights are averaged by number of examples as FedAvg does. Flower itself is not in the loop (its Ray
backend cannot be carried to the lent GPU machines): this measures what a site's GPU changes, the part
of a round that dominates it (see bench_fedavg.py for Flower's share). The device is chosen with
FEDWARD_DEVICE, as a site operator would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.site import SiteRuntime  # noqa: E402
from client.train import DEVICE_ENV  # noqa: E402
from common.config import load_study  # noqa: E402
from common.keys import Met  # noqa: E402
from common.metrics import HIST_BINS, pooled_summary  # noqa: E402
from common.models import build_model  # noqa: E402
from common.privacy import request_config  # noqa: E402
from common.round import RoundPlan  # noqa: E402
from common.simulated import simulated_sites  # noqa: E402


def run_rounds(study, runtimes: list[SiteRuntime], rounds: int) -> tuple[list[float], float]:
    """R rounds on the device FEDWARD_DEVICE names; (seconds per round, final pooled AUC)."""
    weights = build_model(study.model.name, num_classes=2, seed=study.seed).state_dict()
    times, auc = [], float("nan")
    for rnd in range(1, rounds + 1):
        plan = RoundPlan.from_study(study, rnd, in_channels=1, num_classes=2, study_id=f"bench-{os.getpid()}")
        config = plan.to_config() | (request_config(study.privacy) if study.privacy.enabled else {})
        _sync()
        t0 = time.perf_counter()
        replies = [rt.train(config, weights) for rt in runtimes]
        total = sum(r.metrics[Met.NUM_EXAMPLES] for r in replies)
        weights = {
            k: sum(r.weights[k].float() * (r.metrics[Met.NUM_EXAMPLES] / total) for r in replies)
            for k in weights
        }
        evaluations = [rt.evaluate(config, weights).metrics for rt in runtimes]
        _sync()
        times.append(time.perf_counter() - t0)
        auc = pooled_summary(
            [
                {
                    "confusion": np.asarray(m[Met.CONFUSION]).reshape(2, 2),
                    "score_hist": np.asarray(m[Met.SCORE_HIST]).reshape(2, 2, HIST_BINS),
                }
                for m in evaluations
            ]
        )["auc"]
        print(f"  {os.environ[DEVICE_ENV]} round {rnd}: {times[-1]:.2f} s, pooled AUC {auc:.4f}", flush=True)
    return times, auc


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", action="store_true", help="the DP study (configs/pneumoniamnist-dp.yaml)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = "configs/pneumoniamnist-dp.yaml" if args.dp else "configs/pneumoniamnist.yaml"
    study = load_study(Path(__file__).resolve().parents[1] / config, data_dir=args.data_dir)
    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    medians = {}
    with tempfile.TemporaryDirectory() as state:
        sites = simulated_sites(study, state_root=state)
        for site in sites:  # a bench's own budget: as many rounds as it runs
            site.privacy.max_epsilon = 1e6
        for dev in devices:
            os.environ[DEVICE_ENV] = dev
            runtimes = [SiteRuntime.load(site) for site in sites]
            times, _ = run_rounds(study, runtimes, args.rounds)
            medians[dev] = statistics.median(times[1:] or times)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"\n== {study.name}: median round time after round 1 ({args.rounds} rounds, {len(sites)} sites; "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads; GPU: {name})"
    )
    for dev, med in medians.items():
        print(f"  {dev:<5} {med:8.2f} s")
    if "cuda" in medians:
        print(f"  CPU / GPU: {medians['cpu'] / medians['cuda']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
