"""A whole deployment on one machine: a SuperLink and one SuperNode per site, TLS and authentication.

    fedward deploy-local --out runs/deploy                   # deploy/local/study.yaml, 3 hospitals
    fedward deploy-local --out runs/deploy --rounds 2 --resume

This is Flower's Deployment Engine exactly as hospitals run it, only on 127.0.0.1: credentials from
`server.certs` (a CA, the SuperLink's TLS certificate, one key pair per site), a SuperLink with TLS
and `--enable-supernode-auth`, each site's public key registered with `flwr supernode register`,
one SuperNode per site started with its own site config (`--node-config site-config=...`: data
partition, privacy policy, state folder), the study submitted with `flwr run . <connection>`, and
every process stopped afterwards, also on failure or Ctrl-C.

`--insecure` runs plain HTTP without SuperNode authentication (any local process could join as a
site); it prints a warning and is meant for debugging only.

`LocalDeployment` does each step on its own, so tests and benchmarks can also kill a SuperNode,
restart the SuperLink, or start a SuperNode with a key that was never registered. Each process it
starts is a `server.processes.Service` (its log, and a stop that reaches every process it started).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from common.config import PROJECT_ROOT, ConfigError, load_site, load_study
from server import certs
from server.processes import Service, free_port

log = logging.getLogger("fedward.deploy")
LOCAL_DIR = PROJECT_ROOT / "deploy" / "local"
DEFAULT_STUDY = LOCAL_DIR / "study.yaml"
CONNECTION = "fedward-local"  # the SuperLink connection's name in the CLI's config.toml
ONLINE = re.compile(r"SuperNode ID: (\d+)")
INSECURE_WARNING = (
    "INSECURE deployment: plain-text HTTP and no SuperNode authentication. Any process that can "
    "reach {address} can join the study as a site and read the global model. Use it only to debug."
)


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which process and shows the end of its log."""


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each process with its own FLWR_HOME and log.

    Layout of `work_dir`: certs/ (server.certs), superlink/ (state.db, log, FLWR_HOME),
    sites/<site>/ (site.yaml, state/ with the privacy ledger, log, FLWR_HOME), flwr-cli/ (the CLI's
    FLWR_HOME with the connection). Use it as a context manager: every process is stopped on exit.
    """

    def __init__(
        self,
        work_dir: str | Path,
        *,
        site_templates: str | Path = LOCAL_DIR / "sites",
        insecure: bool = False,
        project: str | Path = PROJECT_ROOT,
        site_threads: int = 1,
    ) -> None:
        self.work = Path(work_dir).resolve()
        self.templates = Path(site_templates)
        self.sites = sorted(p.stem for p in self.templates.glob("*.yaml"))
        if not self.sites:
            raise ConfigError(f"{self.templates}: no site configs (*.yaml) to deploy")
        self.insecure = insecure
        self.project = Path(project).resolve()
        self.site_threads = site_threads
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.services: dict[str, Service] = {}
        self.node_ids: dict[str, int] = {}
        self.credentials: certs.Credentials | None = None
        self.cli_home = self.work / "flwr-cli"
        self.link_dir = self.work / "superlink"
        if insecure:
            warnings.warn(INSECURE_WARNING.format(address=self.address), UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ files

    def site_config(self, site: str) -> Path:
        return self.work / "sites" / site / "site.yaml"

    def state_dir(self, site: str) -> Path:
        return self.work / "sites" / site / "state"

    def prepare(self) -> None:
        """Credentials, one site config per site (with its own state folder) and the CLI connection."""
        self.work.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            self.credentials = certs.make_credentials(self.work / "certs", self.sites)
        for site in self.sites:
            template = self.templates / f"{site}.yaml"
            data = yaml.safe_load(template.read_text()) or {}
            if data.get("site", site) != site:
                raise ConfigError(
                    f"{template}: 'site' is '{data['site']}' but the file is named for '{site}'"
                )
            data["site"] = site
            data["state_dir"] = str(self.state_dir(site))
            self.state_dir(site).mkdir(parents=True, exist_ok=True)
            self.site_config(site).write_text(yaml.safe_dump(data, sort_keys=False))
            load_site(self.site_config(site))  # validate now, not inside a SuperNode
        self.cli_home.mkdir(parents=True, exist_ok=True)
        conn = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
        )
        if self.insecure:
            conn += "insecure = true\n"
        else:
            conn += f'root-certificates = "{self.credentials.superlink_ca}"\n'
        (self.cli_home / "config.toml").write_text(conn)

    def env(self, flwr_home: Path, **extra: str) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # use the installed packages, no uv
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> Service:
        if name in self.services and self.services[name].alive():
            raise DeploymentError(f"{name} is already running")
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            start = out.tell()
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        service = Service(name, proc, log_path, start)
        self.services[name] = service
        return service

    # ------------------------------------------------------------------ the SuperLink

    def start_superlink(self, timeout: float = 60.0) -> Service:
        """Start (or restart, keeping registrations in state.db) the SuperLink; wait until it listens."""
        self.link_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--database", str(self.link_dir / "state.db"), "--disable-runtime-dependency-installation"]
        if self.insecure:
            cmd += ["--insecure"]
        else:
            c = self.credentials
            cmd += ["--ssl-ca-certfile", str(c.superlink_ca), "--ssl-certfile", str(c.server_cert)]
            cmd += ["--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]
        service = self._spawn("superlink", cmd, self.env(self.link_dir / "flwr-home"), self.link_dir)
        self._wait(service, lambda: "Uvicorn running on" in service.log_text(), timeout, "listen")
        return service

    def restart_superlink(self) -> Service:
        """Kill the SuperLink (and its ServerApp) as a crash would, and start it again."""
        self.services["superlink"].kill()
        return self.start_superlink()

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this deployment's SuperLink."""
        return subprocess.run(
            ["flwr", *args],
            cwd=self.project,
            env=self.env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, site: str) -> int | None:
        """Register the site's public key with the SuperLink (`flwr supernode register`).

        Returns the new node id, or None when the key was registered before (a SuperLink restarted
        on the same state database keeps its registrations).
        """
        if self.insecure:
            raise DeploymentError("an insecure deployment has no SuperNode authentication to register with")
        pub = self.credentials.registered_pubs[site]
        proc = self.flwr("supernode", "register", str(pub), CONNECTION, "--format", "json")
        try:
            reply = json.loads(proc.stdout)
        except ValueError:
            reply = {}
        if reply.get("success"):
            self.node_ids[site] = int(reply["node-id"])
            return self.node_ids[site]
        if "already in use" in str(reply.get("error-message", "")):
            return None
        raise DeploymentError(f"registering {site} ({pub}) failed:\n{proc.stdout}\n{proc.stderr}")

    # ------------------------------------------------------------------ SuperNodes

    def start_supernode(
        self,
        site: str,
        *,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        name: str | None = None,
        wait: bool = True,
        timeout: float = 60.0,
        extra_args: tuple[str, ...] = (),
    ) -> Service:
        """Start the site's SuperNode with its site config; wait (by default) until it is online.

        `key` and `ca` replace the site's own authentication key and trusted CA (to test refusals).
        """
        home = self.work / "sites" / site
        cmd = ["flower-supernode", "--superlink", self.address, "--port", str(free_port())]
        cmd += ["--node-config", f"site-config='{self.site_config(site)}'"]
        if self.insecure:
            cmd += ["--insecure"]
        else:
            c = self.credentials
            cmd += ["--root-certificates", str(ca or c.site_cas[site])]
            cmd += ["--auth-supernode-private-key", str(key or c.site_keys[site])]
        cmd += list(extra_args)
        env = self.env(home / "flwr-home", FEDWARD_SITE_THREADS=str(self.site_threads))
        service = self._spawn(name or f"supernode-{site}", cmd, env, home)
        if wait:
            self.wait_online(service, timeout)
        return service

    def wait_online(self, service: Service, timeout: float = 60.0) -> int:
        self._wait(service, lambda: ONLINE.search(service.log_text()) is not None, timeout, "connect")
        return int(ONLINE.findall(service.log_text())[-1])

    def rejoin(self, site: str, timeout: float = 120.0, every: float = 3.0) -> Service:
        """Start a killed site's SuperNode again until the SuperLink lets it back in.

        A SuperNode that died without saying goodbye stays 'online' at the SuperLink until its
        heartbeats are overdue (up to a minute); until then the SuperLink refuses to activate it again.
        A site's supervisor (compose `restart: unless-stopped`, Kubernetes) retries the same way.
        """
        deadline = time.monotonic() + timeout
        while True:
            service = self.start_supernode(site, wait=False)
            try:
                self.wait_online(service, max(deadline - time.monotonic(), 1.0))
                return service
            except DeploymentError:
                if time.monotonic() > deadline:
                    raise
                service.stop()
                time.sleep(every)

    def start_all(self) -> None:
        """The SuperLink, every site registered, every SuperNode online."""
        self.prepare()
        self.start_superlink()
        for site in self.sites:
            if not self.insecure:
                self.register(site)
        for site in self.sites:
            self.start_supernode(site, wait=False)
        for site in self.sites:
            self.wait_online(self.services[f"supernode-{site}"])

    def kill(self, name: str) -> None:
        self.services[name].kill()

    def _wait(self, service: Service, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not service.alive():
                raise DeploymentError(
                    f"{service.name} exited (code {service.proc.returncode}) before it could {what}; "
                    f"its log ({service.log_path}) ends:\n{service.tail()}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{service.name} did not {what} within {timeout:.0f}s; its log ({service.log_path}) "
                    f"ends:\n{service.tail()}"
                )
            time.sleep(0.2)

    # ------------------------------------------------------------------ the study

    def run_config(
        self, study: str | Path, out_dir: str | Path, *, rounds: int | None = None, resume: bool = False
    ) -> str:
        items = [f"study-config='{Path(study).resolve()}'", f"out-dir='{Path(out_dir).resolve()}'"]
        if rounds:
            items.append(f"num-rounds={int(rounds)}")
        if resume:
            items.append("resume=true")
        return " ".join(items)

    def submit(
        self, study: str | Path, out_dir: str | Path, *, rounds: int | None = None, resume: bool = False
    ) -> Service:
        """`flwr run . <connection> --stream` in the background; its log is the study's log stream."""
        cmd = ["flwr", "run", str(self.project), CONNECTION, "--stream"]
        cmd += ["-c", self.run_config(study, out_dir, rounds=rounds, resume=resume)]
        n = sum(1 for k in self.services if k.startswith("flwr-run"))
        return self._spawn(f"flwr-run-{n + 1}", cmd, self.env(self.cli_home), self.project)

    def run_study(
        self,
        study: str | Path,
        out_dir: str | Path,
        *,
        rounds: int | None = None,
        resume: bool = False,
        timeout: float = 1800.0,
    ) -> dict:
        """Submit the study, wait until `flwr run` returns, and return results.json."""
        run = self.submit(study, out_dir, rounds=rounds, resume=resume)
        try:
            run.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.stop()
            raise DeploymentError(f"the study did not finish within {timeout:.0f}s:\n{run.tail()}") from None
        results = Path(out_dir) / "results.json"
        if run.proc.returncode != 0 or not results.is_file():
            raise DeploymentError(
                f"`flwr run` exited with code {run.proc.returncode}; its log ({run.log_path}) ends:\n{run.tail()}"
            )
        return json.loads(results.read_text())

    # ------------------------------------------------------------------ stopping

    def stop(self) -> None:
        """Stop every process, the `flwr run` clients and SuperNodes first, the SuperLink last."""
        order = sorted(self.services.values(), key=lambda s: s.name == "superlink")
        for service in order:
            service.stop()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- CLI


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
        "--insecure",
        action="store_true",
        help="plain HTTP, no SuperNode authentication (prints a warning; for debugging only)",
    )


def run(args: argparse.Namespace) -> int:
    """`fedward deploy-local`: start everything, run the study with `flwr run`, stop everything."""
    study = load_study(args.study, rounds=args.rounds)
    out = Path(args.out)
    with warnings.catch_warnings():  # the insecure warning is printed once, below, without a traceback
        warnings.simplefilter("ignore", UserWarning)
        dep = LocalDeployment(out, site_templates=args.sites_dir, insecure=args.insecure)
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
    print(f"status: {results['status']}   results: {out / 'results' / 'results.json'}")
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
