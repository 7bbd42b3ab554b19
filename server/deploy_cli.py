"""`fedward deploy-local`: start a whole local deployment, run the study with `flwr run`, stop it all.

    fedward deploy-local --out runs/deploy                   # deploy/local/study.yaml, 3 hospitals
    fedward deploy-local --out runs/deploy --rounds 2 --resume

The deployment itself is server.deploy.LocalDeployment; this module is its command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from common.config import ConfigError, load_study
from server.deploy import (
    DEFAULT_STUDY,
    INSECURE_WARNING,
    LOCAL_DIR,
    NOT_ISOLATED_WARNING,
    DeploymentError,
    LocalDeployment,
)
from server.run_claim import claim_run_folder
from server.run_folder import RESULTS_FILE

log = logging.getLogger("fedward.deploy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="working folder: certificates, site state, logs, results"
    )
    parser.add_argument("--study", default=str(DEFAULT_STUDY), help="study config (default: %(default)s)")
    parser.add_argument(
        "--sites-dir",
        default=str(LOCAL_DIR / "sites"),
        help="one site config per SuperNode, named <site>.yaml (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, help="override the study's number of rounds")
    parser.add_argument(
        "--resume", action="store_true", help="continue the study in --out after its last round"
    )
    parser.add_argument(
        "--force", action="store_true", help="move a run already in --out/results aside and start afresh"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no SuperNode authentication (prints a warning; for debugging only)",
    )
    parser.add_argument(
        "--no-isolation",
        action="store_true",
        help="run the SuperNodes and ClientApps as you, not as users of their own (warns; debugging only)",
    )


def run(args: argparse.Namespace) -> int:
    """`fedward deploy-local`: start everything, run the study with `flwr run`, stop everything."""
    study = load_study(args.study, rounds=args.rounds)
    out = Path(args.out)
    # the ServerApp claims out/results itself; a run already there is refused (or moved aside) before anything starts
    with claim_run_folder(
        out / "results", resume=args.resume, force=args.force, command="fedward deploy-local"
    ):
        pass
    with warnings.catch_warnings():  # the insecure warning is printed once, below, without a traceback
        warnings.simplefilter("ignore", UserWarning)
        dep = LocalDeployment(
            out, site_templates=args.sites_dir, insecure=args.insecure, isolated=not args.no_isolation
        )
    with dep:
        if study.min_sites > len(dep.sites):
            raise ConfigError(
                f"{args.study}: min_sites is {study.min_sites} but {args.sites_dir} has {len(dep.sites)} sites"
            )
        if study.data.num_sites != len(dep.sites):
            log.warning(
                "%s: data.num_sites is %d but %d sites are deployed",
                args.study,
                study.data.num_sites,
                len(dep.sites),
            )
        if args.insecure:
            print(f"WARNING: {INSECURE_WARNING.format(address=dep.address)}", file=sys.stderr)
        if args.no_isolation:
            print(f"WARNING: {NOT_ISOLATED_WARNING}", file=sys.stderr)
        dep.start_all()
        mode = "plain HTTP, no authentication" if args.insecure else "TLS, SuperNode authentication"
        print(f"SuperLink on {dep.address} ({mode}); SuperNodes online: {', '.join(dep.sites)}")
        print(f"logs: {dep.work / 'logs'}   study stream: {dep.work / 'logs' / 'flwr-run-1.log'}")
        results = dep.run_study(args.study, out / "results", rounds=args.rounds, resume=args.resume)
    for r in results["rounds"]:
        failed = ", ".join(f"{k} ({v})" for k, v in r.get("failed", {}).items()) or "none"
        print(
            f"round {r['round']}: pooled AUC {r['pooled'].get('auc')}  trained: {', '.join(r['participants'])}  failed: {failed}"
        )
    print(f"status: {results['status']}   results: {out / 'results' / RESULTS_FILE}")
    return 0 if results.get("status") == "completed" else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedward deploy-local", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ConfigError, DeploymentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
