"""What a real deployment costs per round: the same study in simulation and over loopback TLS.

    python bench/bench_deployment.py [--study deploy/local/study.yaml] [--rounds 3] [--out DIR]

Runs the study twice in one run, on the same machine and data: with Flower's simulation engine
(`fedward simulate`), then over Flower's Deployment Engine as `fedward deploy-local` starts it (a
SuperLink with TLS and SuperNode authentication, one SuperNode per site on 127.0.0.1, `flwr run`).
Prints per round the wall time of each (medians after round 1, which warms up caches), the sites' own work (training plus evaluation, summed), and
the deployment's extra cost per round = deployment round - simulation round, plus the one-off costs
(starting the SuperLink and SuperNodes, submitting the run).

Where the extra cost comes from in Flower 1.42: every message starts a fresh ClientApp process at the
site (Python, torch, MONAI and Opacus imported again, the site's data loaded again), the ServerApp
polls for replies every 3 s, and the model travels over HTTPS instead of in memory.
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
from server.deploy import DEFAULT_STUDY, LOCAL_DIR, LocalDeployment  # noqa: E402
from server.simulate import simulate  # noqa: E402


def site_work(results: dict) -> list[float]:
    """Per round: the sites' training plus evaluation seconds, summed over sites."""
    timing, out = results["timing"], []
    for i in range(len(results["rounds"])):
        out.append(
            sum(v[i] or 0.0 for v in timing["train_s"].values())
            + sum(v[i] or 0.0 for v in timing["eval_s"].values())
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default=str(DEFAULT_STUDY))
    parser.add_argument("--sites-dir", default=str(LOCAL_DIR / "sites"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fedward-bench-deploy-"))
    study = load_study(args.study, rounds=args.rounds)

    t0 = time.perf_counter()
    sim = simulate(study, out / "simulation")
    sim_wall = time.perf_counter() - t0

    with LocalDeployment(out / "deployment", site_templates=args.sites_dir) as dep:
        t0 = time.perf_counter()
        dep.start_all()
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dep_results = dep.run_study(args.study, out / "deployment" / "results", rounds=args.rounds)
        dep_wall = time.perf_counter() - t0
    first_round_s = dep_results["timing"]["total_s"] - sum(dep_results["timing"]["round_s"])

    sim_rounds, dep_rounds = sim["timing"]["round_s"], dep_results["timing"]["round_s"]
    sim_work, dep_work = site_work(sim), site_work(dep_results)
    sites = len(sim["final"]["sites"])
    print(
        f"\n== {study.name}: {sites} sites, {study.rounds} rounds, {study.model.name}, "
        f"{study.data.synthetic.train_per_site} training images per site (seconds)"
    )
    print("  round   simulation (site work)   deployment TLS (site work)   extra   ratio")
    for i, (s, d) in enumerate(zip(sim_rounds, dep_rounds, strict=True)):
        print(
            f"  {i + 1:>5}   {s:10.2f} ({sim_work[i]:5.2f})        {d:10.2f} ({dep_work[i]:5.2f})"
            f"      {d - s:6.2f}   {d / s:5.1f}x"
        )
    later = slice(1, None) if len(sim_rounds) > 1 else slice(None)  # round 1 warms up caches
    sim_med, dep_med = statistics.median(sim_rounds[later]), statistics.median(dep_rounds[later])
    extra = dep_med - sim_med
    print(
        f"  median round after round 1: simulation {sim_med:.2f} s, deployment {dep_med:.2f} s "
        f"({dep_med / sim_med:.1f}x); extra cost per round {extra:.2f} s, {extra / 2:.2f} s per phase "
        f"(train, evaluate: each starts a fresh ClientApp process at every site, {sites} at once)"
    )
    launch_s = dep_wall - dep_results["timing"]["total_s"]
    print(
        f"  one-off: SuperLink + {sites} SuperNodes up in {start_s:.1f} s; `flwr run` until the ServerApp "
        f"runs {launch_s:.1f} s; initial evaluation {first_round_s:.1f} s (simulation: whole study "
        f"{sim_wall:.1f} s, deployment: whole study {dep_wall:.1f} s)"
    )
    print(
        f"  final pooled AUC: simulation {sim['final']['pooled']['auc']:.4f}, "
        f"deployment {dep_results['final']['pooled']['auc']:.4f} (same data and seeds)"
    )
    load = os.getloadavg()
    print(f"  machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    print(f"  results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
