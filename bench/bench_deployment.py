"""What a real deployment costs per round: the same study in simulation and over loopback TLS.

    python bench/bench_deployment.py [--study deploy/local/study.yaml] [--rounds 4] [--out DIR]

Runs the study three times in one run, on the same machine and data: with Flower's simulation engine
(`fedward simulate`); over Flower's Deployment Engine as `fedward deploy-local` starts it (a SuperLink
with TLS and SuperNode authentication, and at each site the site service, a SuperNode and the
ClientApps' runner, as users of their own: run as root); and over the same deployment with the
ClientApp of before the site service (`--no-isolation`), which loads the site's data and trains in the
process Flower starts for every message. Prints per round the wall time of each (medians after round
1, which warms up caches) and the extra cost per round over simulation of each deployment.

Where the rest of the extra cost comes from in Flower 1.42: the SuperNode waits 3 s between pulls when
no message is there (fixed in Flower's code), every message starts a fresh ClientApp process through
the SuperExec, and the model travels over HTTPS instead of in memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_study  # noqa: E402
from server.deploy import DEFAULT_STUDY, LOCAL_DIR, LocalDeployment  # noqa: E402
from server.simulate import simulate  # noqa: E402

IN_PROCESS_APP = '''"""The ClientApp of before the site service: the site's data and training in Flower's process."""
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.forwarder import SOCKET_KEY
from client.site import runtime_for
from common.config import load_site

app = ClientApp()


def answer(msg: Message, context: Context, op: str) -> Message:
    socket = str(context.node_config[SOCKET_KEY])  # <deployment>/sites/<site>/socket/site.sock
    runtime = runtime_for(load_site(socket.rsplit("/socket/", 1)[0] + "/site.yaml"))
    weights = msg.content["arrays"].to_torch_state_dict()
    reply = getattr(runtime, op)(dict(msg.content["config"]), weights)
    records = {"metrics": MetricRecord(dict(reply.metrics)),
               "site": ConfigRecord({"name": reply.site, "refused": reply.refused, "release": reply.release})}
    if reply.weights is not None:
        records["arrays"] = ArrayRecord(reply.weights)
    return Message(RecordDict(records), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return answer(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, context, "evaluate")
'''


def in_process_app(folder: Path) -> Path:
    """This project with the ClientApp of before the site service."""
    app = folder / "in-process-app"
    root = Path(__file__).resolve().parents[1]
    ignore = shutil.ignore_patterns(".git", "tests", "bench", "runs", "__pycache__", "*.egg-info")
    shutil.copytree(root, app, ignore=ignore, dirs_exist_ok=True)
    (app / "client" / "app.py").write_text(IN_PROCESS_APP)
    return app


def deploy(
    study: str, out: Path, sites_dir: str, rounds: int, *, isolated: bool, app: Path | None
) -> tuple[dict, float, float]:
    """(results, seconds to start everything, wall seconds of the study)."""
    with LocalDeployment(out, site_templates=sites_dir, isolated=isolated) as dep:
        t0 = time.perf_counter()
        dep.start_all()
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = dep.run_study(study, out / "results", rounds=rounds, app=app)
        return results, start_s, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default=str(DEFAULT_STUDY))
    parser.add_argument("--sites-dir", default=str(LOCAL_DIR / "sites"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fedward-bench-deploy-", dir="/tmp"))
    study = load_study(args.study, rounds=args.rounds)

    t0 = time.perf_counter()
    sim = simulate(study, out / "simulation")
    sim_wall = time.perf_counter() - t0

    out.chmod(0o755)  # the deployment's users enter it
    dep_results, start_s, dep_wall = deploy(
        args.study, out / "deployment", args.sites_dir, args.rounds, isolated=True, app=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not isolated: the old ClientApp reads the files
        old_results, _, _ = deploy(
            args.study, out / "before", args.sites_dir, args.rounds, isolated=False, app=in_process_app(out)
        )
    first_round_s = dep_results["timing"]["total_s"] - sum(dep_results["timing"]["round_s"])

    sim_rounds, dep_rounds, old_rounds = (r["timing"]["round_s"] for r in (sim, dep_results, old_results))
    sites = len(sim["final"]["sites"])
    print(
        f"\n== {study.name}: {sites} sites, {study.rounds} rounds, {study.model.name}, "
        f"{study.data.synthetic.train_per_site} training images per site, privacy {study.privacy.enabled} (seconds)"
    )
    print("  round   simulation   deployed (site service)   extra   deployed (ClientApp of before)   extra")
    for i, (s, d, o) in enumerate(zip(sim_rounds, dep_rounds, old_rounds, strict=True)):
        print(f"  {i + 1:>5}   {s:10.2f}   {d:23.2f}   {d - s:6.2f}   {o:30.2f}   {o - s:6.2f}")
    later = slice(1, None) if len(sim_rounds) > 1 else slice(None)  # round 1 warms up caches
    sim_med, dep_med, old_med = (statistics.median(r[later]) for r in (sim_rounds, dep_rounds, old_rounds))
    print(
        f"  median round after round 1: simulation {sim_med:.2f} s; deployed with the site service "
        f"{dep_med:.2f} s (extra {dep_med - sim_med:.2f} s per round, target <= 5); with the ClientApp of "
        f"before {old_med:.2f} s (extra {old_med - sim_med:.2f} s)"
    )
    launch_s = dep_wall - dep_results["timing"]["total_s"]
    print(
        f"  one-off: SuperLink, site services and {sites} SuperNodes up in {start_s:.1f} s; `flwr run` until "
        f"the ServerApp runs {launch_s:.1f} s; initial evaluation {first_round_s:.1f} s (simulation: whole "
        f"study {sim_wall:.1f} s, deployment: whole study {dep_wall:.1f} s)"
    )
    print(
        f"  final pooled AUC: simulation {sim['final']['pooled']['auc']:.4f}, "
        f"deployment {dep_results['final']['pooled']['auc']:.4f} (same data; privacy noise differs run to run)"
    )
    load = os.getloadavg()
    print(f"  machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    print(f"  results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
