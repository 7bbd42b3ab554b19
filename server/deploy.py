"""A whole deployment on one machine: a SuperLink and one SuperNode per site, TLS and authentication.

    fedward deploy-local --out runs/deploy                   # deploy/local/study.yaml, 3 hospitals
    fedward deploy-local --out runs/deploy --rounds 2 --resume

This is Flower's Deployment Engine exactly as hospitals run it, only on 127.0.0.1: credentials from
`server.certs` (a CA, the SuperLink's TLS certificate, one key pair per site), a SuperLink with TLS
and `--enable-supernode-auth`, each site's public key registered with `flwr supernode register`,
and at each site three parties (server.deploy_site): the hospital's site service (`fedward site serve`
with the site's config: data, privacy policy, ledger), a SuperNode, and the runner of the ClientApps
Flower starts, the last two as OS users of their own that reach the site only through the service's
socket (`--node-config site-socket=...`); the study submitted with `flwr run . <connection>`, and
every process stopped afterwards, also on failure or Ctrl-C.

`--insecure` runs plain HTTP without SuperNode authentication (any local process could join as a
site); it prints a warning and is meant for debugging only.

`LocalDeployment` does each step on its own, so tests and benchmarks can also kill a SuperNode,
restart the SuperLink, or start a SuperNode with a key that was never registered. Each process it
starts is a `server.processes.Service` (its log, and a stop that reaches every process it started).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from common.config import PROJECT_ROOT, ConfigError
from server import certs, isolation
from server.deploy_site import (
    SitePaths,
    isolate,
    service_command,
    superexec_command,
    supernode_command,
    write_site_config,
)
from server.isolation import Account, IsolationError
from server.processes import Service, free_port, stop_together
from server.run_folder import RESULTS_FILE

log = logging.getLogger("fedward.deploy")
LOCAL_DIR = PROJECT_ROOT / "deploy" / "local"
DEFAULT_STUDY = LOCAL_DIR / "study.yaml"
CONNECTION = "fedward-local"  # the SuperLink connection's name in the CLI's config.toml
ONLINE = re.compile(r"SuperNode ID: (\d+)")
SITE_START_S = 120.0  # for a site service to load its data and listen (three at once share the cores)
NOT_ISOLATED_WARNING = (
    "NOT ISOLATED: the SuperNodes and the ClientApps run as you, so the app the coordinator ships "
    "could read the sites' files and the SuperNodes' keys. Use it only to debug."
)
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
        isolated: bool = True,
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
        self.accounts: tuple[Account, Account] | None = None  # (SuperNode's, ClientApps') users
        if isolated:
            try:
                self.accounts = isolation.prepare_users()
            except IsolationError as err:
                raise DeploymentError(str(err)) from None
        elif not insecure:
            warnings.warn(NOT_ISOLATED_WARNING, UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ files

    def paths(self, site: str) -> SitePaths:
        return SitePaths(self.work / "sites" / site)

    def site_config(self, site: str) -> Path:
        return self.paths(site).config

    def state_dir(self, site: str) -> Path:
        return self.paths(site).state

    def prepare(self) -> None:
        """Credentials, one site config per site (with its own state folder) and the CLI connection."""
        self.work.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            self.credentials = certs.make_credentials(self.work / "certs", self.sites)
        if self.accounts is not None:
            self.work.chmod(0o755)  # the sites' users enter it; what they may read inside is set below
            try:
                isolation.check_reachable(self.work, self.accounts)
            except IsolationError as err:
                raise DeploymentError(str(err)) from None
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").chmod(0o700)  # the site services' logs name the sites' files
        for site in self.sites:
            write_site_config(
                self.templates / f"{site}.yaml", site, self.paths(site), isolated=self.accounts is not None
            )
            if self.accounts is not None:
                c = self.credentials
                isolate(
                    self.paths(site),
                    *self.accounts,
                    key=None if c is None else c.site_keys[site],
                    secret=None if c is None else c.superexec_secrets[site],
                )
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
            "HOME": str(flwr_home),  # a process of another user writes nothing to the invoker's home
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # use the installed packages, no uv
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # a SuperExec starts a ClientApp within 0.1 s, not 1
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, account: Account | None = None
    ) -> Service:
        if name in self.services and self.services[name].alive():
            raise DeploymentError(f"{name} is already running")
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            start = out.tell()
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            user = {} if account is None else {"user": account.uid, "group": account.gid, "extra_groups": []}
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True, **user
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
        """Start the site's SuperNode, and the SuperExec that runs its ClientApps; wait (by default)
        until it is online. `key` and `ca` replace the site's own authentication key and trusted CA
        (to test refusals). The site's service must be running (`start_site_service`)."""
        paths, secret = self.paths(site), None
        node, app = self.accounts or (None, None)
        if not self.insecure:
            c = self.credentials
            ca = self._given(Path(ca), paths, node) if ca else c.site_cas[site]
            key = self._given(Path(key), paths, node) if key else c.site_keys[site]
            secret = c.superexec_secrets[site]
        port = free_port()
        cmd = supernode_command(self.address, port, paths, ca=ca, key=key, secret=secret) + list(extra_args)
        name = name or f"supernode-{site}"
        service = self._spawn(name, cmd, self.env(paths.node_home), paths.node_home, node)
        if _runner(name) in self.services:  # the runner of a SuperNode that was killed
            self.services[_runner(name)].stop()
        env = self.env(paths.app_home)  # one ClientApp process per message, each as the ClientApps' user
        self._spawn(_runner(name), superexec_command(port, secret), env, paths.app_home, app)
        if wait:
            self.wait_online(service, timeout)
        return service

    @staticmethod
    def _given(path: Path, paths: SitePaths, node: Account | None) -> Path:
        """A key or CA given for a test, copied to where the SuperNode's user may read it."""
        if node is None:
            return path
        copy = paths.node_home / f"given-{path.name}"
        shutil.copyfile(path, copy)
        isolation.own(copy, node, 0o600)
        return copy

    def start_site_service(self, site: str, timeout: float = SITE_START_S) -> Service:
        """The hospital's own site service: loads the site's data and listens on its socket."""
        service = self._spawn_site_service(site)
        self._wait(service, _serving(service), timeout, "serve")
        return service

    def _spawn_site_service(self, site: str) -> Service:
        paths = self.paths(site)
        env = self.env(paths.root / "service-home", FEDWARD_SITE_THREADS=str(self.site_threads))
        return self._spawn(f"site-{site}", service_command(paths), env, self.project)

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
        # the site services load torch and their data (seconds) while the SuperLink starts and the
        # sites are registered: each of those is one process on one core
        started = [self._spawn_site_service(site) for site in self.sites]
        self.start_superlink()
        for site in self.sites:
            if not self.insecure:
                self.register(site)
        wait_ready([(service, _serving(service)) for service in started], SITE_START_S, "serve")
        for site in self.sites:
            self.start_supernode(site, wait=False)
        for site in self.sites:
            self.wait_online(self.services[f"supernode-{site}"])

    def kill(self, name: str) -> None:
        """Kill a process as a crash would (a SuperNode together with its ClientApps' runner)."""
        self.services[name].kill()
        if _runner(name) in self.services:
            self.services[_runner(name)].kill()

    def _wait(self, service: Service, ready: Callable[[], bool], timeout: float, what: str) -> None:
        wait_ready([(service, ready)], timeout, what)

    # ------------------------------------------------------------------ the study

    def run_config(
        self,
        study: str | Path,
        out_dir: str | Path,
        *,
        rounds: int | None = None,
        resume: bool = False,
        packages: list[str | Path] | None = None,
    ) -> str:
        """`flwr run`'s run config; with `packages` the ServerApp validates them (server.validate)."""
        items = [f"study-config='{Path(study).resolve()}'", f"out-dir='{Path(out_dir).resolve()}'"]
        if rounds:
            items.append(f"num-rounds={int(rounds)}")
        if resume:
            items.append("resume=true")
        if packages:
            items.append(f"validate-packages='{','.join(str(Path(p).resolve()) for p in packages)}'")
        return " ".join(items)

    def submit(
        self,
        study: str | Path,
        out_dir: str | Path,
        *,
        rounds: int | None = None,
        resume: bool = False,
        app: str | Path | None = None,
        packages: list[str | Path] | None = None,
    ) -> Service:
        """`flwr run <app> <connection> --stream` in the background (the app: this project, unless
        another folder is given); its log is the study's log stream. With `packages`: a validation."""
        cmd = ["flwr", "run", str(app or self.project), CONNECTION, "--stream"]
        cmd += ["-c", self.run_config(study, out_dir, rounds=rounds, resume=resume, packages=packages)]
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
        app: str | Path | None = None,
    ) -> dict:
        """Submit the study, wait until `flwr run` returns, and return results.json."""
        run = self.submit(study, out_dir, rounds=rounds, resume=resume, app=app)
        try:
            run.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.stop()
            raise DeploymentError(f"the study did not finish within {timeout:.0f}s:\n{run.tail()}") from None
        results = Path(out_dir) / RESULTS_FILE
        if run.proc.returncode != 0 or not results.is_file():
            raise DeploymentError(
                f"`flwr run` exited with code {run.proc.returncode}; its log ({run.log_path}) ends:\n{run.tail()}"
            )
        return json.loads(results.read_text())

    # ------------------------------------------------------------------ stopping

    def stop(self) -> None:
        """Stop every process, the SuperLink last: first the study's clients, the SuperNodes and their
        runners, then the site services, then the SuperLink; the processes of each step together."""
        services = list(self.services.values())
        site_services = [s for s in services if s.name.startswith("site-")]
        superlink = [s for s in services if s.name == "superlink"]
        try:
            stop_together([s for s in services if s not in site_services + superlink])
        finally:  # an error or Ctrl-C in one step still stops the rest (they run in sessions of their own)
            try:
                stop_together(site_services)
            finally:
                stop_together(superlink)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(waits: list[tuple[Service, Callable[[], bool]]], timeout: float, what: str) -> None:
    """Wait until every service is ready; the first one to exit before, or the first not ready
    within `timeout` seconds, is a DeploymentError naming it and showing its log's end."""
    deadline, pending = time.monotonic() + timeout, list(waits)
    while True:
        pending = [(service, ready) for service, ready in pending if not ready()]
        if not pending:
            return
        for service, _ in pending:
            if not service.alive():
                raise DeploymentError(
                    f"{service.name} exited (code {service.proc.returncode}) before it could {what}; "
                    f"its log ({service.log_path}) ends:\n{service.tail()}"
                )
        if time.monotonic() > deadline:
            service = pending[0][0]
            raise DeploymentError(
                f"{service.name} did not {what} within {timeout:.0f}s; its log ({service.log_path}) "
                f"ends:\n{service.tail()}"
            )
        time.sleep(0.2)


def _serving(service: Service) -> Callable[[], bool]:
    """Whether a site service listens on its socket yet (its log says so)."""
    return lambda: "serving on" in service.log_text()


def _runner(supernode: str) -> str:
    """The name of the SuperExec that runs a SuperNode's ClientApps."""
    return (
        supernode.replace("supernode", "superexec", 1)
        if supernode.startswith("supernode")
        else f"{supernode}-superexec"
    )
