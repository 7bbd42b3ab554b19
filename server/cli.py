"""The `fedward` command.

fedward simulate configs/demo.yaml --out runs/demo          # a whole study on this machine
fedward simulate configs/demo.yaml --out runs/demo --resume # continue after the last finished round
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from common.config import ConfigError, load_site, load_study
from common.package import PackageError, read_meta
from common.simulated import num_sites
from server.interrupt import interruptible


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from server.run_claim import check_run_folder
    from server.run_folder import FINAL_MODEL_FILE, LOG_FILE, RESULTS_FILE
    from server.tracking import Tracker, simulate_run

    study = load_study(args.config, rounds=args.rounds, num_sites=args.sites, data_dir=args.data_dir)
    console.print(
        f"[bold]fedward[/] study '{study.name}': {num_sites(study)} "
        f"sites, {study.rounds} rounds, model {study.model.name}, strategy {study.strategy.name} -> {args.out}"
    )
    out = Path(args.out)
    tracker = Tracker(args.mlflow, console)
    tracker.check()
    # a config or run folder that cannot be used is answered before torch, MONAI and Flower are loaded
    # (seconds); `simulate` checks the folder again, for those who call it from Python
    check_run_folder(out, resume=args.resume, force=args.force)
    from server.progress import RichReporter
    from server.simulate import simulate

    with interruptible() as stop:
        results = simulate(
            study, args.out, resume=args.resume, force=args.force, reporter=RichReporter(console),
            verbose=args.verbose, stop=stop, command=command_line(),
        )  # fmt: skip
    if results.get("status") == "interrupted":
        info = results.get("interrupted", {})
        console.print(
            f"[yellow]interrupted[/] ({info.get('signal')}) after round {info.get('round_reached')}; "
            f"continue with: {escape(str(info.get('resume')))}", highlight=False,
        )  # fmt: skip
        return stop.exit_code or 130
    console.print(f"results: {out / RESULTS_FILE}   model: {out / FINAL_MODEL_FILE}   log: {out / LOG_FILE}")
    simulate_run(tracker, out, results)
    return 0 if results.get("status") == "completed" else 3


def command_line() -> str:
    """The command that started this process, as a user would type it again."""
    return " ".join(["fedward", *(shlex.quote(a) for a in sys.argv[1:])])


# The site and package commands read the site config and the package's package.json first (both
# light; main() answers their errors) and import what reads images or builds networks after, so a
# wrong path is answered in about a second.


def _site_check(args: argparse.Namespace, console: Console) -> int:
    config = load_site(args.site_config)
    from client.check import check_and_render

    return check_and_render(config, show_all=args.all)


def _site_serve(args: argparse.Namespace, console: Console) -> int:
    config = load_site(args.site_config)
    from client.ledger import LedgerError
    from client.service import ServiceError, serve
    from common.sitedata import SiteDataError

    try:
        return serve(config, socket=args.socket)
    except (ServiceError, SiteDataError, LedgerError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2


def _site_validate(args: argparse.Namespace, console: Console) -> int:
    config = load_site(args.site_config)
    for package in args.package:  # --package is repeatable
        read_meta(package)
    from client.site_validate import SiteDataError, validate_here

    try:
        doc = validate_here(config, args.package, args.out, split=args.split)
    except (SiteDataError, PackageError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    from server.report import build_report
    from server.validate_cli import table

    report = build_report(args.out)
    console.print(table(doc))
    console.print(f"validation: {Path(args.out) / 'validation.json'}   report: {report} (nothing left the site)",
                  highlight=False)  # fmt: skip
    return 0


def _site_monitor(args: argparse.Namespace, console: Console) -> int:
    from server.tracking import Tracker, monitor_run

    tracker = Tracker(args.mlflow, console)
    tracker.check()
    config = load_site(args.site_config)
    read_meta(args.package)
    from client.monitor import monitor
    from common.sitedata import SiteDataError

    try:
        doc = monitor(config, args.package, data_config=args.data, days=args.days,
                      reference_config=args.reference)  # fmt: skip
    except (SiteDataError, PackageError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    from server.report.monitor import write_monitor_report

    report = write_monitor_report(args.out, doc)
    monitor_run(tracker, Path(args.out), doc)
    for f in doc["features"]:
        if f["status"] != "stable":
            console.print(f"[{'red' if f['status'] == 'drift' else 'yellow'}]{f['status']}[/]: {f['feature']} "
                          f"({f['group']})" + (f", PSI {f['psi']:.2f}, p {f['p']:.2g}" if "psi" in f else ""),
                          highlight=False)  # fmt: skip
    for note in doc["notes"]:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(
        f"{doc['status']}: {len(doc['drifting'])} drifting feature(s); report: {report}", highlight=False
    )
    return 1 if doc["status"] == "drift" else 0


def _study(args: argparse.Namespace, console: Console) -> int:
    from server.run_folder import STUDY_FILE
    from server.study.plan import check_study_folder, validate_comparison, variants
    from server.tracking import Tracker, study_run

    study = load_study(args.config, rounds=args.rounds, num_sites=args.sites, data_dir=args.data_dir)
    validate_comparison(study)
    tracker = Tracker(args.mlflow, console)
    tracker.check()
    # a config or study folder that cannot be used is answered before torch, MONAI and Flower are
    # loaded; `run_comparison` checks the folder again, for those who call it from Python
    check_study_folder(Path(args.out), force=args.force)
    console.print(
        f"[bold]fedward study[/] '{study.name}': {num_sites(study)} sites, {study.rounds} rounds x "
        f"{study.train.local_epochs} local epochs, model {study.model.name}; runs: "
        f"{', '.join(variants(study))}"
        + (", local-only" if study.study.local else "")
        + (", centralized" if study.study.centralized else "")
        + (", leave-one-out" if study.study.leave_one_out else "")
        + f" -> {args.out}",
        highlight=False,
    )
    from server.study.run import run_comparison, summary_table

    with interruptible() as stop:
        doc = run_comparison(
            study, args.out, console=console, verbose=args.verbose, force=args.force, stop=stop
        )
    if doc["status"] == "interrupted":
        console.print(
            f"[yellow]interrupted[/]: {escape(doc['summary'][0])}; {escape(doc['interrupted']['resume'])}"
        )
        return stop.exit_code or 130
    console.print(summary_table(doc))
    for line in doc["summary"]:
        console.print(f"- {line}", highlight=False)
    console.print(f"study: {args.out}/{STUDY_FILE}   report: {args.out}/report.html", highlight=False)
    study_run(tracker, Path(args.out), doc)
    return 0 if doc["status"] == "completed" else 3


def _predict(args: argparse.Namespace, console: Console) -> int:
    read_meta(args.package)
    from client.predict import predict

    path = predict(args.package, args.input, args.out, heatmaps=not args.no_heatmaps, site=args.site)
    console.print(f"predictions: {path}", highlight=False)
    return 0


def _serve(args: argparse.Namespace, console: Console) -> int:
    read_meta(args.package)
    if args.dicomweb:
        from client.dicomweb_poller import serve_dicomweb

        try:
            return serve_dicomweb(args.package, url=args.dicomweb, state=args.state, interval_s=args.poll_s,
                                  backlog=args.backlog, undelivered=args.undelivered)  # fmt: skip
        except (PackageError, RuntimeError) as err:
            console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
            return 2
    host, _, rest = args.pacs.partition(":")
    port, _, title = rest.partition("@")
    if not (host and port.isdigit() and title):
        console.print(
            f"[red]error:[/] --pacs {args.pacs!r}: give HOST:PORT@AE_TITLE, e.g. 127.0.0.1:4242@ORTHANC"
        )
        return 2
    from client.dicom_node import serve

    try:
        return serve(args.package, ae_title=args.ae_title, port=args.port, pacs=(host, int(port), title),
                     undelivered=args.undelivered, host=args.host, also_from=args.allow_aet)  # fmt: skip
    except (PackageError, RuntimeError) as err:  # RuntimeError: e.g. an undelivered folder it cannot write
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2


def _report(args: argparse.Namespace, console: Console) -> int:
    from server.report import cli

    return cli(args, console)


def build_parser() -> argparse.ArgumentParser:
    """Long: one argparse declaration per command and option, read top to bottom as the CLI's help."""
    from server import tracking

    parser = argparse.ArgumentParser(prog="fedward", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a whole study on this machine (Flower simulation engine)")
    sim.add_argument("config", help="study config YAML, e.g. configs/demo.yaml")
    sim.add_argument("--out", required=True, help="folder for results.json, checkpoints, model and log")
    sim.add_argument("--rounds", type=int, help="override the number of rounds")
    sim.add_argument("--sites", type=int, help="override the number of sites")
    sim.add_argument("--data-dir", help="folder of data files (overrides FEDWARD_DATA and the config)")
    sim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    sim.add_argument(
        "--force", action="store_true", help="--out holds a run: move it aside (not deleted) and start afresh"
    )
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    tracking.add_argument(sim)
    sim.set_defaults(func=_simulate)
    st = sub.add_parser(
        "study", help="federated vs local-only vs centralized vs leave-one-site-out, with a report"
    )
    st.add_argument("config", help="study config YAML, e.g. configs/study-demo.yaml")
    st.add_argument("--out", required=True, help="folder for study.json, report.html, plots and the runs")
    st.add_argument("--rounds", type=int, help="override the number of rounds")
    st.add_argument("--sites", type=int, help="override the number of sites")
    st.add_argument("--data-dir", help="folder of data files (overrides FEDWARD_DATA and the config)")
    st.add_argument(
        "--force", action="store_true", help="--out holds a run: move it aside (not deleted) and start afresh"
    )
    st.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    tracking.add_argument(st)
    st.set_defaults(func=_study)
    pr = sub.add_parser("predict", help="a model package's predictions and Grad-CAM heat maps on image files")
    pr.add_argument("package", help="a run folder (its model/ package) or a package folder")
    pr.add_argument("input", help="a DICOM, PNG/JPEG or NIfTI file, or a folder of them")
    pr.add_argument("--out", required=True, help="folder for predictions.csv and heatmaps/")
    pr.add_argument("--no-heatmaps", action="store_true", help="skip the heat maps (occlusion sensitivity)")
    pr.add_argument(
        "--site", default="", help="prepare images as this training site did (default: the first)"
    )
    pr.set_defaults(func=_predict)
    sv = sub.add_parser(
        "serve", help="beside the PACS: images in (C-STORE or DICOMweb), report and heat map back"
    )
    sv.add_argument("package", help="a run folder (its model/ package) or a package folder")
    sv.add_argument(
        "--port", type=int, default=11112, help="port to receive images on (default: %(default)s)"
    )
    sv.add_argument("--ae-title", default="FEDWARD", help="this node's AE title (default: %(default)s)")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="--pacs: the address to listen on (default: %(default)s, this machine only; 0.0.0.0 or "
        "this machine's own address for a PACS on another machine)",
    )
    sv.add_argument(
        "--allow-aet",
        action="append",
        default=[],
        metavar="AE_TITLE",
        help="--pacs: also take images from this calling AE title (a modality; repeatable); the PACS's "
        "own title is always taken, any other association is rejected",
    )
    way = sv.add_mutually_exclusive_group(required=True)
    way.add_argument("--pacs", help="C-STORE in on --port; results go to HOST:PORT@AE_TITLE")
    way.add_argument("--dicomweb", help="pull new images from this DICOMweb root and store results there")
    sv.add_argument(
        "--undelivered",
        default="fedward-undelivered",
        help="folder for results the PACS did not take, to send on later (default: %(default)s)",
    )
    sv.add_argument("--poll-s", type=float, default=10.0, help="--dicomweb: seconds between polls")
    sv.add_argument(
        "--state",
        default="fedward-serve-state.json",
        help="--dicomweb: what was handled (default: %(default)s)",
    )
    sv.add_argument("--backlog", action="store_true", help="--dicomweb: also predict what was there before")
    sv.set_defaults(func=_serve)
    rep = sub.add_parser("report", help="rebuild report.html and the plots from a run folder's JSON")
    rep.add_argument("dir", help="the --out folder of a `fedward study` or `fedward simulate` run")
    rep.set_defaults(func=_report)

    site = sub.add_parser("site", help="what a site operator runs at the hospital")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    check = site_sub.add_parser(
        "check", help="is this site's data usable? (images, labels, splits, bad files)"
    )
    check.add_argument("site_config", help="the site config YAML")
    check.add_argument("--all", action="store_true", help="list every problem, not only the first ones")
    check.set_defaults(func=_site_check)
    serve = site_sub.add_parser(
        "serve", help="run the site service: it alone holds the data, the model, the policy and the ledger"
    )
    serve.add_argument("site_config", help="the site config YAML")
    serve.add_argument(
        "--socket", help="Unix socket to listen on (default: the site config's service.socket)"
    )
    serve.set_defaults(func=_site_serve)
    sval = site_sub.add_parser(
        "validate", help="validate model packages on this site's own data, in-house: nothing leaves the site"
    )
    sval.add_argument("site_config", help="the site config YAML")
    sval.add_argument("--package", action="append", required=True, help="a model package (repeat for more)")
    sval.add_argument("--out", required=True, help="folder for validation.json and report.html")
    sval.add_argument("--split", choices=("all", "test"), default="all", help="which images (default: all)")
    sval.set_defaults(func=_site_validate)
    mon = site_sub.add_parser(
        "monitor",
        help="has this site's data drifted from what a package was trained on here? (exit 1: drift)",
    )
    mon.add_argument("site_config", help="the site config YAML (its state_dir holds what it trained on)")
    mon.add_argument("--package", required=True, help="the model package in use")
    mon.add_argument("--out", required=True, help="folder for monitor.json, report.html and the plots")
    mon.add_argument(
        "--data", help="a site config whose data section is the new export (default: the site's own)"
    )
    mon.add_argument("--days", type=int, help="only images acquired in the last N days (acquisition date)")
    mon.add_argument("--reference", help="a site config of the export the package was trained on, when the "
                     "site kept no record of it")  # fmt: skip
    tracking.add_argument(mon)
    mon.set_defaults(func=_site_monitor)

    from server import certs, deploy_cli

    cp = sub.add_parser("certs", help="make a CA, the SuperLink's TLS certificate and one key pair per site")
    certs.add_arguments(cp)
    cp.set_defaults(func=lambda args, console: certs.run(args))
    dp = sub.add_parser(
        "deploy-local", help="SuperLink + one SuperNode per site on 127.0.0.1 (TLS, auth), run a study, stop"
    )
    deploy_cli.add_arguments(dp)
    dp.set_defaults(func=lambda args, console: deploy_cli.run(args))

    from server import audit_cli, compare, validate_cli

    va = sub.add_parser("validate", help=validate_cli.HELP)
    validate_cli.add_arguments(va)
    va.set_defaults(func=validate_cli.run)
    co = sub.add_parser("compare", help=compare.HELP)
    compare.add_arguments(co)
    co.set_defaults(func=compare.run)

    audit_cli.add_arguments(sub.add_parser("audit", help=audit_cli.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the run's INFO lines go to its log file only
        handler.setLevel(logging.WARNING)
    try:
        return args.func(args, console)
    except (ConfigError, PackageError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except Exception as err:
        from server.deploy import DeploymentError

        if not isinstance(err, DeploymentError):
            raise
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
