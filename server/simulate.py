"""`fedward simulate`: a whole study on this machine with Flower's simulation engine (Ray backend).

Every simulated site is one virtual SuperNode running the same ClientApp a hospital runs. By default
each site gets all CPU cores and sites take turns (a round's wall time is then the sum of the sites'
work plus Flower's own share, which `bench/bench_fedavg.py` measures); a GPU is used when present.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from client.ledger import LedgerError, ledger_notices
from common.config import ConfigError
from common.data import load_site_data
from common.model_spec import model_spec
from common.schema import MIN_INPUT_SIZE, StudyConfig
from common.simulated import simulated_sites
from common.sitedata import SiteDataError
from server.coordinator import Reporter
from server.interrupt import StopRequest
from server.packages import continue_simulated_ledgers, pretrained_package, study_package
from server.ray_session import backend_config, one_ray_session
from server.run_claim import check_run_folder, claim_run_folder
from server.run_folder import LOG_FILE, RESULTS_FILE, SITES_DIR, VALIDATION_FILE

log = logging.getLogger("fedward.simulate")


def preflight(study: StudyConfig, out_dir: Path) -> list:
    """Load every simulated site's data once before any training: bad input fails here, named.

    Simulated sites keep their state (privacy ledger) in OUT_DIR/sites/<site> unless their own
    site config names a state_dir. A study with `model.init_from` has its package checked against
    it, and its simulated sites go on with the ledgers of the package's run (server.packages).
    """
    sites = simulated_sites(study, state_root=out_dir / SITES_DIR)
    spec = model_spec(study)
    if study.model.pretrained:  # the same network, loadable: checked now
        pretrained_package(study)
    if study.model.init_from:  # checked against the study now; the simulated sites' ledgers go on
        carried = continue_simulated_ledgers(
            study_package(study.model.init_from, study), sites, out_dir / SITES_DIR
        )
        if carried:
            log.info("model.init_from: the ledgers of %s go on from the package's run", ", ".join(carried))
    for site in sites:
        try:
            data = load_site_data(site)
            notices = ledger_notices(site.state_dir) if site.state_dir else []
        except (SiteDataError, LedgerError) as err:
            raise ConfigError(f"{study.source_path}: site '{site.site}': {err}") from err
        for notice in notices:
            log.warning("site '%s': %s", site.site, notice)
        if site.data.classes and sites[0].data.classes and site.data.classes != sites[0].data.classes:
            raise ConfigError(
                f"{study.source_path}: site '{site.site}' lists classes {site.data.classes} but site "
                f"'{sites[0].site}' lists {sites[0].data.classes}; every site must list the same classes."
            )
        problem = spec.problem_with(data)
        if problem:  # the site would refuse every round: say so now
            raise ConfigError(f"{study.source_path}: site '{site.site}' refuses the study: {problem}.")
        needed = MIN_INPUT_SIZE.get(study.model.name, 0)
        if min(data.train_x.shape[-2:]) < needed:
            raise ConfigError(
                f"{study.source_path}: 'model.name' {study.model.name} needs images of at least "
                f"{needed}x{needed} pixels; site '{site.site}' gives {tuple(data.train_x.shape[-2:])}."
            )
    return sites


def simulate(
    study: StudyConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
    verbose: bool = False,
    sites: list | None = None,
    stop: StopRequest | None = None,
    command: str = "",
) -> dict:
    """Run `study` in simulation; returns the results dict also written to OUT_DIR/results.json.

    OUT_DIR is claimed for the run (server.run_claim: locked; a run already in it is continued with
    `resume` or moved aside with `force`, never overwritten). `sites` (SiteConfigs) replaces the
    study's own sites, e.g. all sites but one for leave-one-out. `stop` (server.interrupt) ends the run
    early with `status: interrupted`; `command` is the command line that started it (the lock file
    names it; with --resume added it is the command that continues an interrupted run).
    """
    out = Path(out_dir)
    check_run_folder(out, resume=resume, force=force)
    sites = preflight(study, out) if sites is None else sites
    command = command or f"fedward simulate {study.source_path or 'CONFIG'} --out {out}"
    with claim_run_folder(out, resume=resume, force=force, command=command):
        return _simulate(study, out, sites, resume=resume, reporter=reporter, verbose=verbose, stop=stop,
                         resume_command=_resume_command(command))  # fmt: skip


def _resume_command(command: str) -> str:
    words = [w for w in command.split() if w != "--force"]
    return " ".join(words if "--resume" in words else [*words, "--resume"])


def _simulate(
    study: StudyConfig, out: Path, sites: list, *, resume, reporter, verbose, stop, resume_command
) -> dict:
    from server.app import make_server_app

    results_path = out / RESULTS_FILE
    stale = results_path.stat().st_mtime_ns if results_path.exists() else None
    server_app = make_server_app(
        study,
        out,
        resume=resume,
        reporter=reporter,
        n_sites=len(sites),
        stop=stop,
        resume_command=resume_command,
    )
    run_engine(study, sites, server_app, verbose=verbose, stop=stop)
    if not results_path.exists() or results_path.stat().st_mtime_ns == stale:
        raise RuntimeError(f"the simulation ended without writing {results_path}; see {out / LOG_FILE}")
    results = json.loads(results_path.read_text())
    if results.get("status") == "interrupted":
        return results
    if results.get("status") == "running":
        raise RuntimeError(f"the study did not finish; see {out / LOG_FILE}")
    return results


def run_engine(
    study: StudyConfig, sites: list, server_app, *, verbose: bool, stop: StopRequest | None
) -> None:
    """`server_app` and the ClientApp of `sites` (one virtual SuperNode each) on Flower's simulation
    engine, in this process's one Ray session; returns when the ServerApp's main has."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    config = backend_config(study)
    os.environ["FEDWARD_SITE_THREADS"] = str(config["client_resources"]["num_cpus"])
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    with one_ray_session(study):  # Ray started here, so that SIGTERM stays ours (server.interrupt)
        if stop is not None:
            stop.rearm()
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(sites),
            num_supernodes=len(sites),
            backend_config=config,
            verbose_logging=verbose,
        )


def validate_simulated(
    study: StudyConfig,
    packages: list[str],
    out_dir: str | Path,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
    verbose: bool = False,
    stop: StopRequest | None = None,
    command: str = "",
) -> dict:
    """`fedward validate` (server.validate) on the study's simulated sites; returns validation.json's dict.
    The packages are checked against the study before any site loads its data."""
    from server.app import make_server_app
    from server.validate import check_packages

    out = Path(out_dir)
    check_packages(study, packages)
    check_run_folder(out, resume=False, force=force, kind="validation")
    sites = preflight(study, out)
    command = command or f"fedward validate ... --out {out}"
    with claim_run_folder(out, resume=False, force=force, command=command, kind="validation"):
        server_app = make_server_app(study, out, reporter=reporter, n_sites=len(sites), stop=stop,
                                     packages=[str(p) for p in packages])  # fmt: skip
        run_engine(study, sites, server_app, verbose=verbose, stop=stop)
    path = out / VALIDATION_FILE
    if not path.exists():
        raise RuntimeError(f"the validation ended without writing {path}; see {out / LOG_FILE}")
    from server.report import build_report

    build_report(out)
    return json.loads(path.read_text())
